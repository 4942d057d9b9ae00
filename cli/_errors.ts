/**
 * Maps thrown errors to DESIGN.md's exit codes and prints them the one way: `sectorlog: <message>`
 * and, when there is one, a `hint:` line saying what to do next.
 *
 * @module
 */
import { CommanderError } from "commander";
import { AssertionError } from "../lib/_assert.ts";
import { EXIT_FAILED, EXIT_OK, EXIT_USAGE, exitCodeFor, UsageError } from "../lib/errors.ts";
import { say } from "./_output.ts";

/** Prints `error` on stderr and returns the exit code it stands for. */
export function reportError(error: unknown): number {
  if (error instanceof CommanderError) {
    // Commander already printed its message; help and version are successes.
    if (error.code === "commander.helpDisplayed" || error.code === "commander.version") {
      return EXIT_OK;
    }
    if (error.code === "commander.help") return EXIT_OK;
    return EXIT_USAGE;
  }
  if (error instanceof AssertionError) {
    say(`sectorlog: internal error (a bug, please report it): ${error.message}`);
    if (error.stack !== undefined) say(error.stack);
    return EXIT_FAILED;
  }
  const message = error instanceof Error ? error.message : String(error);
  say(`sectorlog: ${message}`);
  const hint = (error as { hint?: string }).hint;
  if (hint !== undefined) say(`hint: ${hint}`);
  if (Deno.env.get("SECTORLOG_DEBUG") !== undefined && error instanceof Error) {
    say(error.stack ?? "");
  }
  return exitCodeFor(error);
}

/** Parses an integer option, naming the option in the error. */
export function parseIntegerOption(value: string, option: string): number {
  if (!/^\d+$/.test(value)) {
    throw new UsageError(`Invalid ${option} ${JSON.stringify(value)}: expected a whole number`);
  }
  return Number(value);
}
