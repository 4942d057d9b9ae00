/**
 * Invariant checks for programmer errors. A failed assertion means a bug in sectorlog, never bad
 * user input: user input errors are the typed errors of `errors.ts`.
 *
 * @module
 */

/** Thrown when an internal invariant does not hold. */
export class AssertionError extends Error {
  override name = "AssertionError";
}

/** Throws an {@linkcode AssertionError} unless `condition` holds. */
export function assert(condition: unknown, message = "Assertion failed"): asserts condition {
  if (!condition) throw new AssertionError(message);
}

/** Asserts that `value` is a non-negative safe integer (offsets, lengths, sequence numbers). */
export function assertUint(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new AssertionError(`${what} must be a non-negative safe integer, got ${value}`);
  }
}
