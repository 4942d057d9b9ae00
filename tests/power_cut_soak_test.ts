/**
 * The short power-cut soak CI runs: a few hundred cuts over seeds that change every run (the
 * first seed is printed, and SECTORLOG_SEED replays a run). `deno task soak` runs the long one.
 */
import assert from "node:assert/strict";
import { soakSeed } from "./_power_cut_soak.ts";
import { testSeed } from "./_helpers.ts";

const SEEDS = 40;
const CUTS_PER_SEED = 10;

Deno.test(`power-cut soak: ${SEEDS} seeds × ${CUTS_PER_SEED} cuts keep every promise`, async () => {
  const firstSeed = testSeed();
  const violations: string[] = [];
  let cuts = 0;
  for (let i = 0; i < SEEDS; i++) {
    const seed = (firstSeed + i) >>> 0;
    const report = await soakSeed({ seed, cuts: CUTS_PER_SEED });
    cuts += report.cuts;
    for (const violation of report.violations) {
      violations.push(
        `seed ${violation.seed} cut ${violation.cut}: ${violation.message} ` +
          `(replay: deno task soak --seeds 1 --seed ${violation.seed} --cuts ${CUTS_PER_SEED} --verbose)`,
      );
    }
  }
  console.log(`soak: seeds ${firstSeed}..${firstSeed + SEEDS - 1}, ${cuts} power cuts`);
  assert.deepEqual(violations, [], `soak from SECTORLOG_SEED=${firstSeed}`);
  assert.equal(cuts, SEEDS * CUTS_PER_SEED);
});
