/**
 * The error classes the library throws. The CLI maps each class to one exit code of DESIGN.md:
 * {@linkcode UsageError} → 2, {@linkcode IntegrityError} → 3, {@linkcode BusyError} → 4, anything
 * else → 1.
 *
 * @module
 */

/** Bad usage or bad input (an argument, a TIME, a missing logdir). Exit code 2. */
export class UsageError extends Error {
  override name = "UsageError";
  /** A hint on what to do next, printed on its own line. */
  hint?: string;
  constructor(message: string, options?: { hint?: string; cause?: unknown }) {
    super(message, { cause: options?.cause });
    this.hint = options?.hint;
  }
}

/** Corruption or inconsistency found in a logdir or snapshot. Exit code 3. */
export class IntegrityError extends Error {
  override name = "IntegrityError";
  /** The file that holds the problem, when there is one. */
  path?: string;
  /** The byte offset within {@linkcode IntegrityError.path}, when known. */
  offsetBytes?: number;
  constructor(message: string, options?: { path?: string; offsetBytes?: number; cause?: unknown }) {
    super(message, { cause: options?.cause });
    this.path = options?.path;
    this.offsetBytes = options?.offsetBytes;
  }
}

/** Another process holds the lock this operation needs. Exit code 4. */
export class BusyError extends Error {
  override name = "BusyError";
  /** The pid of the holder, when the lock file names one. */
  holderPid?: number;
  constructor(message: string, options?: { holderPid?: number }) {
    super(message);
    this.holderPid = options?.holderPid;
  }
}

/** Exit codes of DESIGN.md. */
export const EXIT_OK = 0;
/** I/O or network failure. */
export const EXIT_FAILED = 1;
/** Bad usage or bad input. */
export const EXIT_USAGE = 2;
/** Integrity problem found. */
export const EXIT_INTEGRITY = 3;
/** Another process holds the logdir lock. */
export const EXIT_BUSY = 4;

/** Maps an error to its exit code. */
export function exitCodeFor(error: unknown): number {
  if (error instanceof UsageError) return EXIT_USAGE;
  if (error instanceof IntegrityError) return EXIT_INTEGRITY;
  if (error instanceof BusyError) return EXIT_BUSY;
  return EXIT_FAILED;
}
