import assert from "node:assert/strict";
import { UsageError } from "../lib/errors.ts";
import {
  formatDuration,
  formatTimeLocal,
  formatTimeUtc,
  nowUs,
  parseDuration,
  parseTime,
  type TimeSpec,
} from "../lib/time.ts";

/** 2026-11-24T10:15:00Z. */
const BASE_US = 1_795_515_300_000_000;
const SECOND_US = 1_000_000;
const MINUTE_US = 60 * SECOND_US;
const HOUR_US = 60 * MINUTE_US;
const DAY_US = 24 * HOUR_US;
/** Safe integers of µs reach about 1685 to 2255; random times stay well inside. */
const RANDOM_TIME_US_MAX = 8_000_000_000_000_000;

function instant(text: string, options?: { nowUs?: number }): number {
  const spec = parseTime(text, options);
  assert.equal(spec.kind, "instant", `${text} should parse to an instant`);
  return (spec as Extract<TimeSpec, { kind: "instant" }>).timeUs;
}

function assertTimeRejected(text: string, detail?: RegExp): void {
  assert.throws(() => parseTime(text, { nowUs: BASE_US }), (error: unknown) => {
    assert.ok(error instanceof UsageError, `${JSON.stringify(text)} should throw UsageError`);
    assert.ok(
      error.message.startsWith(`Cannot parse time ${JSON.stringify(text)}: `),
      `message should name the input: ${error.message}`,
    );
    assert.ok(!error.message.endsWith("."), `no trailing period: ${error.message}`);
    if (detail !== undefined) assert.match(error.message, detail);
    return true;
  });
}

function assertDurationRejected(text: string): void {
  assert.throws(() => parseDuration(text), (error: unknown) => {
    assert.ok(error instanceof UsageError, `${JSON.stringify(text)} should throw UsageError`);
    assert.equal(
      error.message,
      `Cannot parse duration ${JSON.stringify(text)}: use a number with a unit s, m, h, d or w ` +
        `(90s, 15m, 36h, 7d, 1h30m) or 0`,
    );
    return true;
  });
}

/** mulberry32: a small seeded generator, so a failing property run can be repeated. */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let mixed = state;
    mixed = Math.imul(mixed ^ (mixed >>> 15), mixed | 1);
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61);
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 4_294_967_296;
  };
}

function propertySeed(): number {
  const fromEnv = Deno.env.get("SECTORLOG_SEED");
  return fromEnv === undefined ? Date.now() % 4_294_967_296 : Number(fromEnv);
}

function randomTimeUs(random: () => number): number {
  // Two draws: one 32-bit draw alone cannot reach every microsecond.
  const coarse = Math.floor(random() * 2 * RANDOM_TIME_US_MAX) - RANDOM_TIME_US_MAX;
  return coarse - (coarse % 1_000_000) + Math.floor(random() * 1_000_000);
}

function forEachSeeded(runs: number, check: (timeUs: number) => void): void {
  const seed = propertySeed();
  const random = seededRandom(seed);
  for (let run = 0; run < runs; run++) {
    const timeUs = randomTimeUs(random);
    try {
      check(timeUs);
    } catch (error) {
      throw new Error(`Failed for timeUs ${timeUs} (SECTORLOG_SEED=${seed})`, { cause: error });
    }
  }
}

/** Runs lib/time.ts in a child process with the given TZ and returns what `script` prints. */
async function inTimeZone(timeZone: string, script: string): Promise<unknown> {
  const moduleUrl = new URL("../lib/time.ts", import.meta.url).href;
  const source = `import * as time from ${JSON.stringify(moduleUrl)};\n${script}`;
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", source],
    env: { TZ: timeZone },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(output.stderr);
  assert.equal(output.code, 0, `child in TZ=${timeZone} failed: ${stderr}`);
  return JSON.parse(new TextDecoder().decode(output.stdout));
}

Deno.test("parseTime() accepts ISO 8601 in UTC", () => {
  assert.equal(instant("2026-11-24T10:15:00Z"), BASE_US);
  assert.equal(instant("2026-11-24t10:15:00z"), BASE_US);
  assert.equal(instant("2026-11-24T10:15Z"), BASE_US);
  assert.equal(instant("2026-11-24 10:15:00Z"), BASE_US);
  assert.equal(instant("1970-01-01T00:00:00Z"), 0);
  assert.equal(instant("2000-02-29T23:59:59Z"), 951_868_799 * SECOND_US);
});

Deno.test("parseTime() accepts ISO 8601 with a zone offset", () => {
  assert.equal(instant("2026-11-24T11:15:00+01:00"), BASE_US);
  assert.equal(instant("2026-11-24T11:15:00+0100"), BASE_US);
  assert.equal(instant("2026-11-24T11:15:00+01"), BASE_US);
  assert.equal(instant("2026-11-24T05:15:00-05:00"), BASE_US);
  assert.equal(instant("2026-11-24T15:45:00+05:30"), BASE_US);
  assert.equal(instant("2026-11-24T00:15:00-10:00"), BASE_US);
  assert.equal(instant("2026-11-25T00:00:00+13:45"), BASE_US);
  assert.equal(instant("2026-11-24 11:15 +01:00"), BASE_US);
  assert.equal(instant("2026-11-24T10:15:01+00:00:01"), BASE_US);
  assert.equal(instant("2026-11-24T10:15:00.250+01:00"), BASE_US - HOUR_US + 250_000);
});

Deno.test("parseTime() keeps every microsecond of a fraction of a second", () => {
  assert.equal(instant("2026-11-24T10:15:00.5Z"), BASE_US + 500_000);
  assert.equal(instant("2026-11-24T10:15:00.25Z"), BASE_US + 250_000);
  assert.equal(instant("2026-11-24T10:15:00.250Z"), BASE_US + 250_000);
  assert.equal(instant("2026-11-24T10:15:00.1234Z"), BASE_US + 123_400);
  assert.equal(instant("2026-11-24T10:15:00.12345Z"), BASE_US + 123_450);
  assert.equal(instant("2026-11-24T10:15:00.000001Z"), BASE_US + 1);
  assert.equal(instant("2026-11-24T10:15:00.999999Z"), BASE_US + 999_999);
  assert.equal(instant("1969-12-31T23:59:59.999999Z"), -1);
});

Deno.test("parseTime() reads a time without a zone as local time", () => {
  const cases: Array<[string, Date, number]> = [
    ["2026-11-24T10:15:00", new Date(2026, 10, 24, 10, 15, 0), 0],
    ["2026-11-24 10:15", new Date(2026, 10, 24, 10, 15, 0), 0],
    ["2026-11-24 10:15:07.123456", new Date(2026, 10, 24, 10, 15, 7), 123_456],
    ["2026-07-01T23:59:59", new Date(2026, 6, 1, 23, 59, 59), 0],
    ["2026-11-24", new Date(2026, 10, 24, 0, 0, 0), 0],
  ];
  for (const [text, date, fractionUs] of cases) {
    assert.equal(instant(text), date.getTime() * 1_000 + fractionUs, text);
  }
});

Deno.test("parseTime() reads local time in the process's TZ (Asia/Kolkata, no DST)", async () => {
  const result = await inTimeZone(
    "Asia/Kolkata",
    `const at = (text) => time.parseTime(text).timeUs;
     console.log(JSON.stringify({
       clock: time.formatTimeUtc(at("2026-11-24 15:45")),
       seconds: time.formatTimeUtc(at("2026-11-24T15:45:30.000001")),
       midnight: time.formatTimeUtc(at("2026-11-24")),
       summer: time.formatTimeUtc(at("2026-07-01 05:30")),
       zoned: time.formatTimeUtc(at("2026-11-24T10:15:00Z")),
       local: time.formatTimeLocal(${BASE_US + 250_000}),
       meanTime: time.formatTimeLocal(time.parseTime("1800-01-01T00:00:00Z").timeUs),
       meanTimeBack: time.formatTimeUtc(time.parseTime("1800-01-01 05:53:28 +05:53:28").timeUs),
     }));`,
  );
  assert.deepEqual(result, {
    clock: "2026-11-24T10:15:00.000000Z",
    seconds: "2026-11-24T10:15:30.000001Z",
    midnight: "2026-11-23T18:30:00.000000Z",
    summer: "2026-07-01T00:00:00.000000Z",
    zoned: "2026-11-24T10:15:00.000000Z",
    local: "2026-11-24 15:45:00.250000 +05:30",
    // Before standard time the zone database gives local mean time, with seconds in the offset.
    meanTime: "1800-01-01 05:53:28.000000 +05:53:28",
    meanTimeBack: "1800-01-01T00:00:00.000000Z",
  });
});

Deno.test("parseTime() rejects a local time that a daylight-saving change skips", async () => {
  const result = await inTimeZone(
    "America/New_York",
    `let gap;
     try { time.parseTime("2026-03-08 02:30"); } catch (error) { gap = error.message; }
     console.log(JSON.stringify({
       gap,
       before: time.formatTimeUtc(time.parseTime("2026-03-08 01:59:59").timeUs),
       after: time.formatTimeUtc(time.parseTime("2026-03-08 03:00").timeUs),
       ambiguous: time.formatTimeUtc(time.parseTime("2026-11-01 01:30").timeUs),
       winter: time.formatTimeLocal(${BASE_US}),
       summer: time.formatTimeLocal(time.parseTime("2026-07-01T12:00:00Z").timeUs),
       meanTime: time.formatTimeLocal(time.parseTime("1800-01-01T00:00:00.5Z").timeUs),
     }));`,
  );
  assert.deepEqual(result, {
    gap: 'Cannot parse time "2026-03-08 02:30": that local time does not exist in time zone ' +
      "America/New_York (a daylight-saving change skips it)",
    before: "2026-03-08T06:59:59.000000Z",
    after: "2026-03-08T07:00:00.000000Z",
    // ECMAScript resolves a repeated local time to the earlier of the two instants (EDT).
    ambiguous: "2026-11-01T05:30:00.000000Z",
    winter: "2026-11-24 05:15:00.000000 -05:00",
    summer: "2026-07-01 08:00:00.000000 -04:00",
    // getTimezoneOffset() would say -04:56; the local clock fields use the exact -04:56:02.
    meanTime: "1799-12-31 19:03:58.500000 -04:56:02",
  });
});

Deno.test("parseTime() accepts now and relative times before now", () => {
  const options = { nowUs: BASE_US };
  assert.equal(instant("now", options), BASE_US);
  assert.equal(instant("-90s", options), BASE_US - 90 * SECOND_US);
  assert.equal(instant("-15m", options), BASE_US - 15 * MINUTE_US);
  assert.equal(instant("-2h", options), BASE_US - 2 * HOUR_US);
  assert.equal(instant("-7d", options), BASE_US - 7 * DAY_US);
  assert.equal(instant("-1w", options), BASE_US - 7 * DAY_US);
  assert.equal(instant("-1h30m", options), BASE_US - 90 * MINUTE_US);
  assert.equal(instant("-0", options), BASE_US);
  assert.equal(instant("  -15m\n", options), BASE_US - 15 * MINUTE_US);
});

Deno.test("parseTime() counts now from the wall clock when nowUs is not given", () => {
  const beforeUs = Date.now() * 1_000;
  const parsedUs = instant("now");
  const relativeUs = instant("-1h");
  const afterUs = Date.now() * 1_000 + 1_000;
  assert.ok(parsedUs >= beforeUs && parsedUs <= afterUs, `${parsedUs} not in clock window`);
  assert.ok(relativeUs >= beforeUs - HOUR_US && relativeUs <= afterUs - HOUR_US);
});

Deno.test("parseTime() accepts @<unix-seconds> with an optional fraction", () => {
  assert.equal(instant("@1795515300"), BASE_US);
  assert.equal(instant("@1764000000.5"), 1_764_000_000_500_000);
  assert.equal(instant("@1764000000.000001"), 1_764_000_000_000_001);
  assert.equal(instant("@0"), 0);
  assert.equal(instant("@-1.5"), -1_500_000);
});

Deno.test("parseTime() returns seq:<n> and mark:<name> unresolved", () => {
  assert.deepEqual(parseTime("seq:0"), { kind: "seq", seq: 0 });
  assert.deepEqual(parseTime("seq:42"), { kind: "seq", seq: 42 });
  assert.deepEqual(parseTime("seq:9007199254740991"), { kind: "seq", seq: 2 ** 53 - 1 });
  assert.deepEqual(parseTime("mark:before-upgrade"), { kind: "mark", name: "before-upgrade" });
  assert.deepEqual(parseTime("mark:a:b c"), { kind: "mark", name: "a:b c" });
});

Deno.test("parseTime() rejects garbage with a message that shows the accepted forms", () => {
  const forms =
    /: use ISO 8601 \(2026-11-24T10:15:00Z\), now, -15m, @<unix-seconds>, seq:<n> or mark:<name>$/;
  for (
    const text of [
      "",
      "   ",
      "yesterday",
      "NOW",
      "-15x",
      "-15",
      "-m",
      "+15m",
      "15m",
      "-1.5h",
      "-500ms",
      "2026",
      "2026-11",
      "2026-1-24",
      "26-11-24",
      "20261124T101500Z",
      "2026-11-24T",
      "2026-11-24T10",
      "2026-11-24T10:15:00.Z",
      "2026-11-24T10:15.5Z",
      "2026-11-24T10:15:00+1",
      "2026-11-24T10:15:00+01:0",
      "2026-11-24T10:15:00+010000",
      "2026-11-24T10:15:00+0100:00",
      "2026-11-24Z",
      "2026-11-24T10:15:00Z extra",
      "2026-11-24  10:15",
      "@",
      "@abc",
      "@1.",
      "@1e9",
      "x".repeat(300),
    ]
  ) {
    assertTimeRejected(text, forms);
  }
});

Deno.test("parseTime() rejects out-of-range fields and names the field", () => {
  assertTimeRejected("2026-13-01", /month 13 is out of range \(01-12\)$/);
  assertTimeRejected("2026-00-10", /month 00 is out of range \(01-12\)$/);
  assertTimeRejected("2026-02-30", /day 30 is out of range for 2026-02 \(01-28\)$/);
  assertTimeRejected("2026-02-29", /day 29 is out of range for 2026-02 \(01-28\)$/);
  assertTimeRejected("2100-02-29T00:00Z", /day 29 is out of range for 2100-02 \(01-28\)$/);
  assertTimeRejected("2026-04-31", /day 31 is out of range for 2026-04 \(01-30\)$/);
  assertTimeRejected("2026-11-00", /day 00 is out of range/);
  assertTimeRejected("2026-11-24 25:00", /hour 25 is out of range \(00-23\)$/);
  assertTimeRejected("2026-11-24T24:00:00Z", /hour 24 is out of range/);
  assertTimeRejected("2026-11-24T10:60Z", /minute 60 is out of range \(00-59\)$/);
  assertTimeRejected("2026-11-24T10:15:60Z", /second 60 is out of range \(00-59\)$/);
  assertTimeRejected("2026-11-24T10:15:00+24:00", /zone offset hour 24 is out of range/);
  assertTimeRejected("2026-11-24T10:15:00+01:60", /zone offset minute 60 is out of range/);
  assertTimeRejected("2026-11-24T10:15:00+01:00:60", /zone offset second 60 is out of range/);
  assertTimeRejected("2026-11-24T10:15:00.1234567Z", /at most 6 fractional digits/);
  assertTimeRejected("@1.1234567", /at most 6 fractional digits/);
  assertTimeRejected("1600-01-01T00:00Z", /outside the range of times sectorlog can hold/);
  assertTimeRejected("0050-01-01", /outside the range of times sectorlog can hold/);
  assertTimeRejected("2300-01-01T00:00Z", /outside the range of times sectorlog can hold/);
  assertTimeRejected("@99999999999", /outside the range of times sectorlog can hold/);
  assertTimeRejected("-999999999w", /too far in the past/);
  assert.equal(instant("2028-02-29T00:00Z"), Date.UTC(2028, 1, 29) * 1_000);
  assert.equal(instant("2000-02-29T00:00Z"), Date.UTC(2000, 1, 29) * 1_000);
});

Deno.test("parseTime() rejects a bad seq:<n> or mark:<name>", () => {
  assertTimeRejected("seq:abc", /seq:<n> takes a non-negative whole number, e.g. seq:42$/);
  assertTimeRejected("seq:", /seq:<n> takes a non-negative whole number/);
  assertTimeRejected("seq:-1", /seq:<n> takes a non-negative whole number/);
  assertTimeRejected("seq:1.5", /seq:<n> takes a non-negative whole number/);
  assertTimeRejected("seq:9007199254740992", /sequence number 9007199254740992 is too large/);
  assertTimeRejected("mark:", /mark:<name> takes a mark name, e.g. mark:before-upgrade$/);
  assertTimeRejected("mark:a\u0007b", /mark:<name> takes a mark name/);
});

Deno.test("parseTime() errors carry a hint with the accepted forms", () => {
  try {
    parseTime("2026-13-01");
    assert.fail("2026-13-01 should be rejected");
  } catch (error) {
    assert.ok(error instanceof UsageError);
    assert.equal(
      error.hint,
      "Use ISO 8601 (2026-11-24T10:15:00Z), now, -15m, @<unix-seconds>, seq:<n> or mark:<name>",
    );
  }
});

Deno.test("parseDuration() accepts s, m, h, d, w, combinations and 0", () => {
  assert.equal(parseDuration("0"), 0);
  assert.equal(parseDuration("0s"), 0);
  assert.equal(parseDuration("90s"), 90 * SECOND_US);
  assert.equal(parseDuration("15m"), 15 * MINUTE_US);
  assert.equal(parseDuration("36h"), 36 * HOUR_US);
  assert.equal(parseDuration("7d"), 7 * DAY_US);
  assert.equal(parseDuration("2w"), 14 * DAY_US);
  assert.equal(parseDuration("1h30m"), 90 * MINUTE_US);
  assert.equal(parseDuration("1w2d3h4m5s"), 9 * DAY_US + 3 * HOUR_US + 4 * MINUTE_US + 5e6);
  assert.equal(parseDuration(" 7d "), 7 * DAY_US);
});

Deno.test("parseDuration() rejects anything else and names the input", () => {
  for (
    const text of [
      "",
      "15",
      "15x",
      "500ms",
      "1.5h",
      "-5m",
      "m",
      "1m1h",
      "1h1h",
      "1h 30m",
      "15M",
      "now",
    ]
  ) {
    assertDurationRejected(text);
  }
});

Deno.test("parseDuration() rejects a duration beyond the range of µs it can hold", () => {
  assert.throws(() => parseDuration("99999999999999w"), (error: unknown) => {
    assert.ok(error instanceof UsageError);
    assert.equal(
      error.message,
      'Cannot parse duration "99999999999999w": it is longer than 285 years',
    );
    return true;
  });
});

Deno.test("formatTimeUtc() writes all six fractional digits", () => {
  assert.equal(formatTimeUtc(BASE_US), "2026-11-24T10:15:00.000000Z");
  assert.equal(formatTimeUtc(BASE_US + 250_000), "2026-11-24T10:15:00.250000Z");
  assert.equal(formatTimeUtc(BASE_US + 1), "2026-11-24T10:15:00.000001Z");
  assert.equal(formatTimeUtc(0), "1970-01-01T00:00:00.000000Z");
  assert.equal(formatTimeUtc(-1), "1969-12-31T23:59:59.999999Z");
  assert.equal(formatTimeUtc(-1_500_000), "1969-12-31T23:59:58.500000Z");
});

Deno.test("formatTimeUtc() rejects a time that is not a safe integer", () => {
  assert.throws(() => formatTimeUtc(1.5), /safe integer/);
  assert.throws(() => formatTimeUtc(Number.NaN), /safe integer/);
});

Deno.test("parseTime() gives back what formatTimeUtc() wrote, for seeded random times", () => {
  forEachSeeded(5_000, (timeUs) => {
    assert.equal(instant(formatTimeUtc(timeUs)), timeUs);
  });
});

Deno.test("parseTime() gives back what formatTimeLocal() wrote, for seeded random times", () => {
  forEachSeeded(5_000, (timeUs) => {
    assert.equal(instant(formatTimeLocal(timeUs)), timeUs);
  });
});

Deno.test("formatTimeLocal() round trips in a zone with a half-hour offset", async () => {
  const result = await inTimeZone(
    "Asia/Kolkata",
    `const times = ${JSON.stringify(Array.from({ length: 200 }, (_, index) => index))}.map(
       (index) => ${BASE_US} + index * 7_919_000_003);
     console.log(JSON.stringify(times.filter(
       (timeUs) => time.parseTime(time.formatTimeLocal(timeUs)).timeUs !== timeUs)));`,
  );
  assert.deepEqual(result, []);
});

Deno.test("formatTimeLocal() writes the local offset", () => {
  const date = new Date(Math.floor(BASE_US / 1_000));
  const offsetMinutes = -date.getTimezoneOffset();
  const sign = offsetMinutes < 0 ? "-" : "+";
  const magnitude = Math.abs(offsetMinutes);
  const offset = `${sign}${String(Math.floor(magnitude / 60)).padStart(2, "0")}:` +
    String(magnitude % 60).padStart(2, "0");
  assert.match(
    formatTimeLocal(BASE_US + 250_001),
    new RegExp(`^2026-11-2[345] \\d{2}:\\d{2}:00\\.250001 \\${offset}$`),
  );
});

Deno.test("formatDuration() writes durations for people", () => {
  assert.equal(formatDuration(0), "0s");
  assert.equal(formatDuration(1), "1µs");
  assert.equal(formatDuration(999), "999µs");
  assert.equal(formatDuration(1_500), "1.5ms");
  assert.equal(formatDuration(250_000), "250ms");
  assert.equal(formatDuration(999_999), "999.999ms");
  assert.equal(formatDuration(SECOND_US), "1s");
  assert.equal(formatDuration(1_250_000), "1.25s");
  assert.equal(formatDuration(59_999_999), "59.999s");
  assert.equal(formatDuration(MINUTE_US), "1m");
  assert.equal(formatDuration(3_723 * SECOND_US), "1h 2m 3s");
  assert.equal(formatDuration(3_723 * SECOND_US + 999_999), "1h 2m 3s");
  assert.equal(formatDuration(HOUR_US + 5 * SECOND_US), "1h 5s");
  assert.equal(formatDuration(2 * DAY_US + 4 * HOUR_US), "2d 4h");
  assert.equal(formatDuration(14 * DAY_US), "14d");
  assert.equal(formatDuration(-250_000), "-250ms");
});

Deno.test("nowUs() follows the wall clock with microsecond resolution", () => {
  for (let sample = 0; sample < 1_000; sample++) {
    const beforeMs = Date.now();
    const timeUs = nowUs();
    const afterMs = Date.now();
    assert.ok(Number.isSafeInteger(timeUs), `${timeUs} is not a safe integer`);
    assert.ok(
      timeUs >= beforeMs * 1_000 && timeUs < (afterMs + 1) * 1_000,
      `${timeUs} outside [${beforeMs} ms, ${afterMs + 1} ms)`,
    );
  }
});
