/**
 * A small seeded PRNG (splitmix32 steps over a 32-bit state) for the simulated disk and the
 * power-cut soak: the same seed gives the same faults and the same schedule.
 *
 * @module
 */

/** A deterministic source of pseudo-random numbers. */
export class SimRandom {
  readonly seed: number;
  #state: number;

  constructor(seed: number) {
    this.seed = seed >>> 0;
    this.#state = this.seed;
  }

  /** Uniform float in [0, 1). */
  next(): number {
    let t = (this.#state = (this.#state + 0x9e3779b9) >>> 0);
    t = Math.imul(t ^ (t >>> 16), 0x21f0aaad);
    t = Math.imul(t ^ (t >>> 15), 0x735a2d97);
    return ((t ^ (t >>> 15)) >>> 0) / 4294967296;
  }

  /** Uniform integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  /** One element of `items`, uniformly. */
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }

  /** Fills `bytes` with pseudo-random bytes. */
  fill(bytes: Uint8Array): void {
    for (let i = 0; i < bytes.length; i += 4) {
      let word = Math.floor(this.next() * 4294967296);
      for (let j = i; j < Math.min(i + 4, bytes.length); j++) {
        bytes[j] = word & 0xff;
        word >>>= 8;
      }
    }
  }

  /** A new generator seeded from this one (independent streams for independent choices). */
  fork(): SimRandom {
    return new SimRandom(this.int(0, 0xffff_ffff));
  }
}
