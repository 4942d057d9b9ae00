/**
 * `deno task soak [--seeds N] [--seed S] [--cuts C] [--verbose]`: the power-cut soak. Runs seeds
 * S, S+1, … (S random unless given), C power cuts each, on a simulated disk, and prints the cuts,
 * the seeds and every violation; a failing seed replays alone with `--seed`. Exit 1 on any
 * violation.
 */
import { parseArgs } from "node:util";
import { soakSeed } from "../tests/_power_cut_soak.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seeds: { type: "string", default: "20" },
    seed: { type: "string" },
    cuts: { type: "string", default: "10" },
    verbose: { type: "boolean", default: false },
  },
});
const seeds = Number(values.seeds);
const cuts = Number(values.cuts);
const firstSeed = values.seed === undefined
  ? Math.floor(Math.random() * 2 ** 31)
  : Number(values.seed);
if (!Number.isSafeInteger(seeds) || seeds < 1 || !Number.isSafeInteger(cuts) || cuts < 1) {
  console.error("Usage: deno task soak [--seeds N] [--seed S] [--cuts C] [--verbose]");
  Deno.exit(2);
}
const startedMs = performance.now();
let totalCuts = 0;
let midSession = 0;
let durableOps = 0;
let ops = 0;
const failed: number[] = [];
const modes: Record<string, number> = {};
const counts = { compactions: 0, refreshes: 0, marksOffline: 0, receivedEntries: 0, tornBytes: 0 };
for (let i = 0; i < seeds; i++) {
  const seed = (firstSeed + i) >>> 0;
  const report = await soakSeed({
    seed,
    cuts,
    log: values.verbose ? (line) => console.log(line) : undefined,
  });
  totalCuts += report.cuts;
  midSession += report.cutsMidSession;
  ops += report.ops;
  durableOps += report.durableOps;
  for (const key of Object.keys(counts) as (keyof typeof counts)[]) counts[key] += report[key];
  for (const [mode, n] of Object.entries(report.cutModes)) modes[mode] = (modes[mode] ?? 0) + n;
  for (const violation of report.violations) {
    console.log(`VIOLATION seed ${violation.seed} cut ${violation.cut}: ${violation.message}`);
  }
  if (report.violations.length > 0) {
    failed.push(seed);
    console.log(`  replay: deno task soak --seeds 1 --seed ${seed} --cuts ${cuts} --verbose`);
  }
}
const seconds = ((performance.now() - startedMs) / 1000).toFixed(1);
console.log(
  `soak: ${seeds} seeds from ${firstSeed}, ${totalCuts} power cuts (${midSession} mid-session), ` +
    `${ops} requests (${durableOps} acknowledged durable), ${counts.compactions} compactions, ` +
    `${counts.refreshes} snapshot refreshes, ${counts.marksOffline} offline marks, ` +
    `${counts.receivedEntries} entries received, ${counts.tornBytes} torn bytes cut, ${seconds} s`,
);
console.log(`cut modes (file/dir): ${JSON.stringify(modes)}`);
console.log(
  `${failed.length} seeds with violations${failed.length > 0 ? `: ${failed.join(" ")}` : ""}`,
);
if (failed.length > 0) Deno.exit(1);
