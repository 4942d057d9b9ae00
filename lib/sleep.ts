/**
 * Waiting without blocking.
 *
 * @module
 */

/**
 * Resolves after `ms`, or as soon as `signal` aborts (at once when it already has); never rejects,
 * so a loop that sleeps between rounds ends its round and then checks the signal.
 *
 * @example
 * ```ts
 * import { sleep } from "./sleep.ts";
 * const stop = new AbortController();
 * setTimeout(() => stop.abort(), 10);
 * await sleep(60_000, stop.signal); // returns after about 10 ms
 * ```
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted === true) return resolve();
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
