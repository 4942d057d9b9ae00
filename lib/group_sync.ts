/**
 * Group commit: many callers ask for durability, one fsync answers all who asked before it began.
 *
 * @module
 */

/**
 * Coalesces concurrent requests for one async operation (an fsync). A request made while the
 * operation runs waits for the *next* run, which starts as soon as the current one ends and then
 * covers every request that arrived in between.
 *
 * @example
 * ```ts
 * import { GroupSync } from "./group_sync.ts";
 * const group = new GroupSync(async () => {});
 * await Promise.all([group.request(), group.request()]); // one or two runs, never three
 * ```
 */
export class GroupSync {
  #run: () => Promise<void>;
  #inFlight: Promise<void> | undefined;
  #next: Promise<void> | undefined;
  #runs = 0;

  constructor(run: () => Promise<void>) {
    this.#run = run;
  }

  /** How many times the operation has started. */
  get runs(): number {
    return this.#runs;
  }

  /** Resolves once a run that started after this call has finished. */
  request(): Promise<void> {
    if (this.#next !== undefined) return this.#next;
    if (this.#inFlight === undefined) return this.#start();
    this.#next = this.#inFlight.then(ignore, ignore).then(() => {
      this.#next = undefined;
      return this.#start();
    });
    return this.#next;
  }

  #start(): Promise<void> {
    this.#runs++;
    const run = this.#run().finally(() => {
      if (this.#inFlight === run) this.#inFlight = undefined;
    });
    this.#inFlight = run;
    return run;
  }
}

function ignore(): void {}
