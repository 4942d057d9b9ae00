/**
 * `deno task bench [restore|watch|compact|ship|s3|all]`: runs the benchmarks, prints what was
 * measured, the machine, each peer's figure, ours, the ratio and the issue's target (PASS/BELOW),
 * and writes the numbers to `bench/results/<date>.json`.
 *
 * Not a CI test: numbers depend on the machine and on whatever else runs on it.
 *
 * @module
 */
import { runCompactBench } from "./compact.ts";
import { runRestoreBench } from "./restore.ts";
import { runS3Bench } from "./s3.ts";
import { runShipBench } from "./ship.ts";
import { canDropCaches, machineFacts, REPO_ROOT, run } from "./_util.ts";
import { runWatchBench } from "./watch.ts";

const USAGE = "usage: deno task bench [restore|watch|compact|ship|s3|all]";

async function main(args: string[]): Promise<number> {
  const which = args[0] ?? "all";
  if (!["restore", "watch", "compact", "ship", "s3", "all"].includes(which) || args.length > 1) {
    console.error(USAGE);
    return 2;
  }
  const facts = await machineFacts();
  const commit = (await run(["git", "rev-parse", "--short", "HEAD"], { allowFailure: true }))
    .stdout.trim();
  const dirty = (await run(["git", "status", "--porcelain", "lib", "cli"], { allowFailure: true }))
    .stdout.trim() !== "";
  console.log(`sectorlog bench (${which}) at ${new Date().toISOString()}`);
  console.log(
    `machine: nproc ${facts.nproc}, ${facts.cpuModel}, ${facts.memTotalGiB} GiB RAM, kernel ${facts.kernel}, deno ${facts.deno}`,
  );
  console.log(
    `load average at start: ${facts.loadAvg} (the machine is shared: other jobs add noise)`,
  );
  console.log(
    `code: commit ${commit}${dirty ? " + uncommitted changes in lib/ or cli/" : ""}; root: ${
      canDropCaches() ? "yes (page cache can be dropped)" : "no"
    }`,
  );
  const results: Record<string, unknown> = {
    date: new Date().toISOString(),
    commit,
    dirty,
    machine: facts,
  };
  if (which === "restore" || which === "all") results.restore = await runRestoreBench();
  if (which === "watch" || which === "all") results.watch = await runWatchBench();
  if (which === "compact" || which === "all") results.compact = await runCompactBench();
  if (which === "ship" || which === "all") results.ship = await runShipBench();
  if (which === "s3" || which === "all") results.s3 = await runS3Bench();
  const dir = `${REPO_ROOT}/bench/results`;
  await Deno.mkdir(dir, { recursive: true });
  const path = `${dir}/${
    new Date().toISOString().replace(/:/g, "-").replace(/\..*/, "")
  }-${which}.json`;
  await Deno.writeTextFile(path, JSON.stringify(results, null, 2) + "\n");
  console.log(`\nresults written to ${path.replace(`${REPO_ROOT}/`, "")}`);
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
