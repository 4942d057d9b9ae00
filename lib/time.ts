/**
 * The TIME and DURATION syntax of DESIGN.md: parsing what users type after `--at`, `--from`,
 * `--to`, `--before` and `--keep`, and formatting times and durations for messages.
 *
 * Every time in sectorlog is an integer count of microseconds since the Unix epoch, a safe integer
 * held in a `number`. Parsing never goes through `Date`'s millisecond precision for the fraction of
 * a second, so `…:00.000001Z` stays exact.
 *
 * @example
 * ```ts
 * import { formatTimeUtc, parseTime } from "./time.ts";
 *
 * const spec = parseTime("2026-11-24T10:15:00.25+01:00");
 * if (spec.kind === "instant") console.log(formatTimeUtc(spec.timeUs));
 * // 2026-11-24T09:15:00.250000Z
 * ```
 *
 * @module
 */

import { assert } from "./_assert.ts";
import { UsageError } from "./errors.ts";

/**
 * A parsed TIME argument. `seq:<n>` and `mark:<name>` name points in a particular logdir, so the
 * caller resolves them against the logdir it opened.
 *
 * @example
 * ```ts
 * import { parseTime, type TimeSpec } from "./time.ts";
 *
 * const spec: TimeSpec = parseTime("mark:before-upgrade");
 * // { kind: "mark", name: "before-upgrade" }
 * ```
 */
export type TimeSpec =
  | { kind: "instant"; timeUs: number }
  | { kind: "seq"; seq: number }
  | { kind: "mark"; name: string };

/** Options of {@linkcode parseTime}. */
export interface ParseTimeOptions {
  /** The time that `now` and relative times (`-15m`) count from. Default: {@linkcode nowUs}. */
  nowUs?: number;
}

const US_PER_MS = 1_000;
const US_PER_SECOND = 1_000_000;
const US_PER_MINUTE = 60 * US_PER_SECOND;
const US_PER_HOUR = 60 * US_PER_MINUTE;
const US_PER_DAY = 24 * US_PER_HOUR;
const US_PER_WEEK = 7 * US_PER_DAY;

/** Fractions of a second finer than this many digits would be below sectorlog's µs resolution. */
const FRACTION_DIGITS_MAX = 6;
/** No TIME or DURATION is this long; longer input is rejected before any regex runs on it. */
const INPUT_CHARS_MAX = 256;

const TIME_FORMS =
  "use ISO 8601 (2026-11-24T10:15:00Z), now, -15m, @<unix-seconds>, seq:<n> or mark:<name>";
const TIME_FORMS_HINT =
  "Use ISO 8601 (2026-11-24T10:15:00Z), now, -15m, @<unix-seconds>, seq:<n> or mark:<name>";
const DURATION_FORMS = "use a number with a unit s, m, h, d or w (90s, 15m, 36h, 7d, 1h30m) or 0";

const ISO_PATTERN = new RegExp(
  "^(?<year>\\d{4})-(?<month>\\d{2})-(?<day>\\d{2})" +
    "(?:[Tt ](?<hour>\\d{2}):(?<minute>\\d{2})" +
    "(?::(?<second>\\d{2})(?:\\.(?<fraction>\\d+))?)?" +
    " ?(?<zone>[Zz]|[+-]\\d{2}(?::\\d{2}(?::\\d{2})?|\\d{2})?)?)?$",
);
const DURATION_UNITS: ReadonlyArray<readonly [number, string]> = [
  [US_PER_DAY, "d"],
  [US_PER_HOUR, "h"],
  [US_PER_MINUTE, "m"],
];
/** Safe integers of µs span about 285 years either side of 1970. */
const OUT_OF_RANGE_REASON = "it is outside the range of times sectorlog can hold (1685 to 2255)";
const ZONE_PATTERN = /^(?<sign>[+-])(?<hours>\d{2}):?(?<minutes>\d{2})?(?::(?<seconds>\d{2}))?$/;
const UNIX_PATTERN = /^@(?<sign>-?)(?<seconds>\d+)(?:\.(?<fraction>\d+))?$/;
const DURATION_PATTERN = /^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/;
const DURATION_UNITS_US = [US_PER_WEEK, US_PER_DAY, US_PER_HOUR, US_PER_MINUTE, US_PER_SECOND];

/**
 * Parses a TIME argument of DESIGN.md. Accepted forms:
 * - ISO 8601: `2026-11-24T10:15:00Z`, `2026-11-24T10:15:00.250+01:00`, `2026-11-24 10:15`,
 *   `2026-11-24` (local midnight); seconds optional, up to 6 fractional digits, zone `Z`, `±HH:MM`,
 *   `±HHMM`, `±HH`, or `±HH:MM:SS` (what {@linkcode formatTimeLocal} writes for local mean time
 *   before 1900). Without a zone the time is local time in the process's time zone (`TZ`).
 * - `now`, and relative times before now: `-90s`, `-15m`, `-2h`, `-7d`, `-1w`, `-1h30m`.
 * - `@<unix-seconds>` with an optional fraction: `@1764000000.5`.
 * - `seq:<n>` and `mark:<name>`, returned unresolved.
 *
 * Throws {@linkcode UsageError} naming the input for anything else, for out-of-range fields
 * (month 13, hour 25, February 30), for local times that a daylight-saving change skips, and for
 * times outside the safe-integer range of microseconds (years 1685 to 2255).
 *
 * @example
 * ```ts
 * import { parseTime } from "./time.ts";
 *
 * parseTime("2026-11-24T10:15:00Z"); // { kind: "instant", timeUs: 1795515300000000 }
 * parseTime("-15m", { nowUs: 1795515300000000 }); // { kind: "instant", timeUs: 1795514400000000 }
 * parseTime("seq:42"); // { kind: "seq", seq: 42 }
 * ```
 */
export function parseTime(text: string, options?: ParseTimeOptions): TimeSpec {
  const input = text.trim();
  if (input.length === 0 || input.length > INPUT_CHARS_MAX) throw timeError(text);
  if (input === "now") return { kind: "instant", timeUs: options?.nowUs ?? nowUs() };
  if (input.startsWith("-")) return parseRelative(text, input.slice(1), options);
  if (input.startsWith("@")) return { kind: "instant", timeUs: parseUnixSeconds(text, input) };
  if (input.startsWith("seq:")) return { kind: "seq", seq: parseSeq(text, input.slice(4)) };
  if (input.startsWith("mark:")) return { kind: "mark", name: parseMarkName(text, input.slice(5)) };
  return { kind: "instant", timeUs: parseIso(text, input) };
}

/**
 * Parses a DURATION argument of DESIGN.md into microseconds: a whole number with a unit `s`, `m`,
 * `h`, `d` or `w`, units combined from largest to smallest (`1h30m`, `1d12h`), or a bare `0`.
 *
 * Throws {@linkcode UsageError} naming the input for anything else.
 *
 * @example
 * ```ts
 * import { parseDuration } from "./time.ts";
 *
 * parseDuration("90s"); // 90000000
 * parseDuration("1h30m"); // 5400000000
 * ```
 */
export function parseDuration(text: string): number {
  const durationUs = parseDurationOrNull(text.trim());
  if (durationUs === null) {
    throw new UsageError(`Cannot parse duration ${quote(text)}: ${DURATION_FORMS}`);
  }
  if (!Number.isSafeInteger(durationUs)) {
    throw new UsageError(`Cannot parse duration ${quote(text)}: it is longer than 285 years`);
  }
  return durationUs;
}

/**
 * Formats a time as UTC ISO 8601 with all six fractional digits, so that no microsecond is lost
 * and {@linkcode parseTime} gives the same time back.
 *
 * @example
 * ```ts
 * import { formatTimeUtc } from "./time.ts";
 *
 * formatTimeUtc(1795515300250000); // "2026-11-24T10:15:00.250000Z"
 * ```
 */
export function formatTimeUtc(timeUs: number): string {
  const { ms, subMsUs } = splitUs(timeUs);
  const iso = new Date(ms).toISOString(); // "2026-11-24T10:15:00.250Z"
  assert(iso.length === 24, `Cannot format time ${timeUs} µs: year outside 0000-9999`);
  return `${iso.slice(0, 23)}${pad(subMsUs, 3)}Z`;
}

/**
 * Formats a time in the process's local time zone with its UTC offset and six fractional digits,
 * in a form that {@linkcode parseTime} accepts back.
 *
 * @example
 * ```ts
 * import { formatTimeLocal } from "./time.ts";
 *
 * // With TZ=Europe/Paris:
 * formatTimeLocal(1795515300250000); // "2026-11-24 11:15:00.250000 +01:00"
 * ```
 */
export function formatTimeLocal(timeUs: number): string {
  const { ms, subMsUs } = splitUs(timeUs);
  const date = new Date(ms);
  const year = date.getFullYear();
  assert(year >= 0 && year <= 9999, `Cannot format time ${timeUs} µs: year outside 0000-9999`);
  const day = `${pad(year, 4)}-${pad(date.getMonth() + 1, 2)}-${pad(date.getDate(), 2)}`;
  const clock = `${pad(date.getHours(), 2)}:${pad(date.getMinutes(), 2)}:` +
    `${pad(date.getSeconds(), 2)}.${pad(date.getMilliseconds(), 3)}${pad(subMsUs, 3)}`;
  return `${day} ${clock} ${formatOffset(localOffsetSeconds(date))}`;
}

/**
 * Formats a duration for people: `1h 2m 3s`, `2d 4h`, `1.5s`, `250ms`, `750µs`. Durations of a
 * minute or more drop the fraction of a second. Negative durations get a leading `-`.
 *
 * @example
 * ```ts
 * import { formatDuration } from "./time.ts";
 *
 * formatDuration(3_723_000_000); // "1h 2m 3s"
 * formatDuration(250_000); // "250ms"
 * ```
 */
export function formatDuration(us: number): string {
  assert(Number.isSafeInteger(us), `Duration must be a safe integer of µs, got ${us}`);
  if (us < 0) return `-${formatDuration(-us)}`;
  if (us === 0) return "0s";
  if (us < US_PER_MS) return `${us}µs`;
  if (us < US_PER_SECOND) return `${formatThousandths(us)}ms`;
  if (us < US_PER_MINUTE) return `${formatThousandths(Math.floor(us / US_PER_MS))}s`;
  const parts: string[] = [];
  let restUs = us;
  for (const [unitUs, unit] of DURATION_UNITS) {
    const count = Math.floor(restUs / unitUs);
    restUs -= count * unitUs;
    if (count > 0) parts.push(`${count}${unit}`);
  }
  const seconds = Math.floor(restUs / US_PER_SECOND);
  if (seconds > 0) parts.push(`${seconds}s`);
  return parts.join(" ");
}

let clockOriginUs = Math.round(performance.timeOrigin * US_PER_MS);

/**
 * The wall-clock time in microseconds since the Unix epoch. Sub-millisecond digits come from the
 * high-resolution clock; the result is kept within the millisecond that `Date.now()` reports, so
 * a stepped or slewed system clock is followed rather than drifted from. Not monotonic: the
 * wall clock may step back, and writers of the log clamp to the previous stamp (DESIGN.md, 3).
 *
 * @example
 * ```ts
 * import { formatTimeUtc, nowUs } from "./time.ts";
 *
 * console.log(formatTimeUtc(nowUs())); // e.g. "2026-11-24T10:15:00.250123Z"
 * ```
 */
export function nowUs(): number {
  const elapsedUs = Math.round(performance.now() * US_PER_MS);
  const wallUs = Date.now() * US_PER_MS;
  const candidateUs = clockOriginUs + elapsedUs;
  // Date.now() truncates to the millisecond, so the true time lies in [wallUs, wallUs + 1 ms).
  const timeUs = Math.min(Math.max(candidateUs, wallUs), wallUs + US_PER_MS - 1);
  clockOriginUs = timeUs - elapsedUs;
  return timeUs;
}

function parseRelative(text: string, durationText: string, options?: ParseTimeOptions): TimeSpec {
  const durationUs = parseDurationOrNull(durationText);
  if (durationUs === null) throw timeError(text);
  const timeUs = (options?.nowUs ?? nowUs()) - durationUs;
  if (!Number.isSafeInteger(timeUs)) throw rangeError(text, "it is too far in the past");
  return { kind: "instant", timeUs };
}

function parseUnixSeconds(text: string, input: string): number {
  const groups = UNIX_PATTERN.exec(input)?.groups;
  if (groups === undefined) throw timeError(text);
  const fractionUs = parseFraction(text, groups.fraction);
  const magnitudeUs = Number(groups.seconds) * US_PER_SECOND + fractionUs;
  const timeUs = groups.sign === "-" ? -magnitudeUs : magnitudeUs;
  if (!Number.isSafeInteger(timeUs)) throw rangeError(text, OUT_OF_RANGE_REASON);
  return timeUs;
}

function parseSeq(text: string, digits: string): number {
  if (!/^\d+$/.test(digits)) {
    throw new UsageError(
      `Cannot parse time ${quote(text)}: seq:<n> takes a non-negative whole number, e.g. seq:42`,
    );
  }
  const seq = Number(digits);
  if (!Number.isSafeInteger(seq)) throw rangeError(text, `sequence number ${digits} is too large`);
  return seq;
}

function parseMarkName(text: string, name: string): string {
  // Control characters would garble messages and listings; no sensible mark name has one.
  // deno-lint-ignore no-control-regex
  if (name.length === 0 || /[\u0000-\u001f\u007f]/.test(name)) {
    throw new UsageError(
      `Cannot parse time ${quote(text)}: mark:<name> takes a mark name, e.g. mark:before-upgrade`,
    );
  }
  return name;
}

function parseIso(text: string, input: string): number {
  const groups = ISO_PATTERN.exec(input)?.groups;
  if (groups === undefined) throw timeError(text);
  const year = Number(groups.year);
  const month = Number(groups.month);
  const day = Number(groups.day);
  const hour = Number(groups.hour ?? "0");
  const minute = Number(groups.minute ?? "0");
  const second = Number(groups.second ?? "0");
  const fractionUs = parseFraction(text, groups.fraction);
  checkField(text, "month", month, 1, 12);
  const dayMax = daysInMonth(year, month);
  if (day < 1 || day > dayMax) {
    throw rangeError(
      text,
      `day ${groups.day} is out of range for ${groups.year}-${groups.month} (01-${dayMax})`,
    );
  }
  checkField(text, "hour", hour, 0, 23);
  checkField(text, "minute", minute, 0, 59);
  checkField(text, "second", second, 0, 59);
  let timeUs: number;
  if (groups.zone === undefined) {
    timeUs = localToUs(text, [year, month, day, hour, minute, second]) + fractionUs;
  } else {
    const offsetSeconds = parseZone(text, groups.zone);
    const utcSeconds = daysFromCivil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 +
      second - offsetSeconds;
    timeUs = utcSeconds * US_PER_SECOND + fractionUs;
  }
  if (!Number.isSafeInteger(timeUs)) throw rangeError(text, OUT_OF_RANGE_REASON);
  return timeUs;
}

function localToUs(text: string, fields: number[]): number {
  const [year, month, day, hour, minute, second] = fields;
  const date = new Date(year, month - 1, day, hour, minute, second);
  // The Date constructor maps years 0-99 to 1900-1999; put the year the user wrote back.
  if (year < 100) date.setFullYear(year);
  // Times that a daylight-saving change skips (02:30 on a spring-forward night) come back shifted.
  const roundTrip = [
    date.getFullYear(),
    date.getMonth() + 1,
    date.getDate(),
    date.getHours(),
    date.getMinutes(),
    date.getSeconds(),
  ];
  if (roundTrip.some((value, index) => value !== fields[index])) {
    throw new UsageError(
      `Cannot parse time ${quote(text)}: that local time does not exist in time zone ` +
        `${localZoneName()} (a daylight-saving change skips it)`,
      { hint: "Give the time with a zone offset, e.g. 2026-03-29T02:30:00+01:00" },
    );
  }
  return date.getTime() * US_PER_MS;
}

/** The UTC offset of an ISO 8601 zone designator, in seconds east of Greenwich. */
function parseZone(text: string, zone: string): number {
  if (zone === "Z" || zone === "z") return 0;
  const groups = ZONE_PATTERN.exec(zone)?.groups;
  assert(groups !== undefined, `ISO_PATTERN let through zone ${zone}`);
  const hours = Number(groups.hours);
  const minutes = Number(groups.minutes ?? "0");
  checkField(text, "zone offset hour", hours, 0, 23);
  checkField(text, "zone offset minute", minutes, 0, 59);
  const seconds = Number(groups.seconds ?? "0");
  checkField(text, "zone offset second", seconds, 0, 59);
  const offsetSeconds = hours * 3_600 + minutes * 60 + seconds;
  return groups.sign === "-" ? -offsetSeconds : offsetSeconds;
}

function parseFraction(text: string, digits: string | undefined): number {
  if (digits === undefined) return 0;
  if (digits.length > FRACTION_DIGITS_MAX) {
    throw new UsageError(
      `Cannot parse time ${quote(text)}: at most ${FRACTION_DIGITS_MAX} fractional digits ` +
        `(microseconds) are allowed, got ${digits.length}`,
      { hint: TIME_FORMS_HINT },
    );
  }
  return Number(digits.padEnd(FRACTION_DIGITS_MAX, "0"));
}

/** Microseconds of a DURATION, possibly not a safe integer, or null when the syntax is wrong. */
function parseDurationOrNull(input: string): number | null {
  if (input === "0") return 0;
  if (input.length === 0 || input.length > INPUT_CHARS_MAX) return null;
  const match = DURATION_PATTERN.exec(input);
  if (match === null) return null;
  let durationUs = 0;
  DURATION_UNITS_US.forEach((unitUs, index) => {
    const count = match[index + 1];
    if (count !== undefined) durationUs += Number(count) * unitUs;
  });
  // Unsafe sums are returned as they are: the callers turn them into a range error.
  return durationUs;
}

function checkField(text: string, field: string, value: number, min: number, max: number): void {
  if (value >= min && value <= max) return;
  throw rangeError(
    text,
    `${field} ${pad(value, 2)} is out of range (${pad(min, 2)}-${pad(max, 2)})`,
  );
}

function timeError(text: string): UsageError {
  return new UsageError(`Cannot parse time ${quote(text)}: ${TIME_FORMS}`);
}

function rangeError(text: string, reason: string): UsageError {
  return new UsageError(`Cannot parse time ${quote(text)}: ${reason}`, {
    hint: TIME_FORMS_HINT,
  });
}

/** Quotes user input for a message; JSON escaping keeps control characters visible. */
function quote(text: string): string {
  return JSON.stringify(text);
}

function daysInMonth(year: number, month: number): number {
  if (month === 2) return isLeapYear(year) ? 29 : 28;
  return [4, 6, 9, 11].includes(month) ? 30 : 31;
}

function isLeapYear(year: number): boolean {
  return (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
}

/**
 * Days from 1970-01-01 to a proleptic Gregorian date, in exact integer arithmetic (Howard
 * Hinnant's `days_from_civil`), so that no `Date` rounding touches zoned times.
 */
function daysFromCivil(year: number, month: number, day: number): number {
  const shiftedYear = month <= 2 ? year - 1 : year;
  const era = Math.floor(shiftedYear / 400);
  const yearOfEra = shiftedYear - era * 400;
  const dayOfYear = Math.floor((153 * (month + (month > 2 ? -3 : 9)) + 2) / 5) + day - 1;
  const dayOfEra = yearOfEra * 365 + Math.floor(yearOfEra / 4) - Math.floor(yearOfEra / 100) +
    dayOfYear;
  return era * 146_097 + dayOfEra - 719_468;
}

function splitUs(timeUs: number): { ms: number; subMsUs: number } {
  assert(Number.isSafeInteger(timeUs), `Time must be a safe integer of µs, got ${timeUs}`);
  const ms = Math.floor(timeUs / US_PER_MS);
  return { ms, subMsUs: timeUs - ms * US_PER_MS };
}

/**
 * The local UTC offset at `date`, in seconds. `getTimezoneOffset()` rounds to whole minutes, but
 * before standard time zones (local mean time, e.g. -04:56:02 in New York) the offset has seconds
 * and the local clock fields use them; reading the fields back as UTC gives the exact offset.
 */
function localOffsetSeconds(date: Date): number {
  const fieldsAsUtc = new Date(0);
  fieldsAsUtc.setUTCFullYear(date.getFullYear(), date.getMonth(), date.getDate());
  fieldsAsUtc.setUTCHours(date.getHours(), date.getMinutes(), date.getSeconds(), 0);
  return Math.round((fieldsAsUtc.getTime() - (date.getTime() - date.getMilliseconds())) / 1_000);
}

function formatOffset(offsetSeconds: number): string {
  // Offsets with seconds (local mean time) are written as ±HH:MM:SS so that nothing is lost.
  const sign = offsetSeconds < 0 ? "-" : "+";
  const magnitude = Math.abs(offsetSeconds);
  const hoursMinutes = `${sign}${pad(Math.floor(magnitude / 3_600), 2)}:` +
    pad(Math.floor(magnitude / 60) % 60, 2);
  return magnitude % 60 === 0 ? hoursMinutes : `${hoursMinutes}:${pad(magnitude % 60, 2)}`;
}

function localZoneName(): string {
  return Intl.DateTimeFormat().resolvedOptions().timeZone ?? "local";
}

/** Formats 1500 as "1.5" and 2000 as "2": a count of thousandths as a short decimal. */
function formatThousandths(thousandths: number): string {
  const whole = Math.floor(thousandths / 1_000);
  const fraction = pad(thousandths % 1_000, 3).replace(/0+$/, "");
  return fraction === "" ? String(whole) : `${whole}.${fraction}`;
}

function pad(value: number, width: number): string {
  return String(value).padStart(width, "0");
}
