/**
 * What every subcommand shares for talking to people and scripts: messages on stderr, one JSON
 * summary on stdout, a progress bar only when stderr is a terminal, byte and time formatting.
 *
 * @module
 */
import cliProgress from "cli-progress";
import process from "node:process";
import { formatTimeLocal, formatTimeUtc } from "../lib/time.ts";

const encoder = new TextEncoder();

/** Prints a line on stderr (messages, warnings, human summaries). */
export function say(line: string): void {
  Deno.stderr.writeSync(encoder.encode(line + "\n"));
}

/** Prints a line on stdout (listings a user asked for). */
export function print(line: string): void {
  writeAllSync(Deno.stdout, encoder.encode(line + "\n"));
}

/** Prints one JSON document on stdout. */
export function printJson(value: unknown): void {
  writeAllSync(Deno.stdout, encoder.encode(JSON.stringify(value, null, 2) + "\n"));
}

function writeAllSync(target: { writeSync(p: Uint8Array): number }, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) done += target.writeSync(bytes.subarray(done));
}

/** A progress reporter: a bar on a TTY, nothing otherwise. Call `stop()` when done. */
export interface Progress {
  update(doneBytes: number, totalBytes: number): void;
  stop(): void;
}

/** Makes a progress bar labelled `label`, shown only when stderr is a terminal. */
export function progressBar(label: string, enabled = true): Progress {
  if (!enabled || !Deno.stderr.isTerminal()) return { update: () => {}, stop: () => {} };
  const bar = new cliProgress.SingleBar({
    format: `${label} [{bar}] {percentage}% | {doneText} of {totalText} | eta {eta_formatted}`,
    stream: process.stderr,
    hideCursor: true,
    clearOnComplete: true,
  }, cliProgress.Presets.shades_classic);
  let started = false;
  return {
    update(doneBytes, totalBytes) {
      const payload = { doneText: formatBytes(doneBytes), totalText: formatBytes(totalBytes) };
      if (!started) {
        bar.start(totalBytes, doneBytes, payload);
        started = true;
      } else {
        bar.setTotal(totalBytes);
        bar.update(doneBytes, payload);
      }
    },
    stop() {
      if (started) bar.stop();
    },
  };
}

/** `1.5 GiB`, `512 B`. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/** A time for people: UTC, then local time in parentheses. */
export function formatTimeBoth(timeUs: number): string {
  return `${formatTimeUtc(timeUs)} (local ${formatTimeLocal(timeUs)})`;
}
