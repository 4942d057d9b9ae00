import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { parseSize } from "../cli/compact.ts";
import { LEVELS_DIR, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { verifyLogdir } from "../lib/verify.ts";
import {
  appendSteps,
  expectedAt,
  filesUnder,
  makeWorkload,
  restoreBytes,
  runCli,
  type Workload,
} from "./_compact_fixture.ts";
import { assertBytesEqual, Random, withTempDir } from "./_helpers.ts";

/** `@<seconds>.<micros>`: a TIME that names `timeUs` exactly. */
function unixTime(timeUs: number): string {
  return `@${Math.floor(timeUs / 1e6)}.${String(timeUs % 1e6).padStart(6, "0")}`;
}

/** A logdir with a fixed workload of heavy overwrites (the CLI tests need no seed variety). */
async function withWorkload(body: (w: Workload) => Promise<void>): Promise<void> {
  await withTempDir(async (dir) => {
    const random = new Random(20261124);
    const w = await makeWorkload(dir, random);
    await appendSteps(w, random, 120, { overwriteHot: true });
    await body(w);
  });
}

/** Apparent bytes of the level and segment files: what compaction reclaims from. */
function journalBytes(logdir: string): number {
  let bytes = 0;
  for (const folder of [LEVELS_DIR, SEGMENTS_DIR]) {
    for (const name of fs.readdirSync(join(logdir, folder))) {
      bytes += fs.statSync(join(logdir, folder, name)).size;
    }
  }
  return bytes;
}

Deno.test("sectorlog compact --dry-run changes no byte of the logdir and prints what it would do", async () => {
  await withWorkload(async (w) => {
    const before = filesUnder(w.logdir);
    const run = await runCli(["compact", w.logdir, "--keep", "0", "--dry-run", "--json"]);
    assert.equal(run.code, 0, run.stderr);
    const summary = JSON.parse(run.stdout);
    assert.equal(summary.command, "compact");
    assert.equal(summary.dryRun, true);
    assert.equal(summary.changed, true);
    assert.ok(summary.reclaimedBytes > 0);
    assert.deepEqual(filesUnder(w.logdir), before);
    const human = await runCli(["compact", w.logdir, "--keep", "0", "--dry-run"]);
    assert.match(human.stderr, /dry run: would fold \d+ entries/);
    assert.deepEqual(filesUnder(w.logdir), before);
  });
});

Deno.test("sectorlog compact --json reports what the disk usage drop is; quiet without --verbose", async () => {
  await withWorkload(async (w) => {
    const cutUs = w.history[80].timeUs;
    const bytesBefore = journalBytes(w.logdir);
    const run = await runCli(["compact", w.logdir, "--before", unixTime(cutUs), "--json"]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stderr, "");
    const summary = JSON.parse(run.stdout);
    for (const field of ["cutUs", "horizonUs", "entriesBefore", "entriesAfter", "durationMs"]) {
      assert.equal(typeof summary[field], "number", field);
    }
    assert.equal(summary.horizonUs, cutUs);
    assert.equal(summary.reclaimedBytes, summary.bytesBefore - summary.bytesAfter);
    assert.ok(summary.reclaimedBytes > 0);
    assert.equal(bytesBefore - journalBytes(w.logdir), summary.reclaimedBytes);
    const quiet = await runCli(["compact", w.logdir, "--before", unixTime(cutUs)]);
    assert.equal(quiet.code, 0, "nothing to do is a success");
    assert.equal(quiet.stderr + quiet.stdout, "");
    const verbose = await runCli(["compact", w.logdir, "--keep", "0", "--verbose"]);
    assert.match(verbose.stderr, /folded \d+ entries up to seq \d+/);
    assert.match(verbose.stderr, /restorable from/);
    assert.ok((await verifyLogdir(w.logdir)).ok);
  });
});

Deno.test("sectorlog compact --max-bytes moves the cut forward and says so", async () => {
  await withWorkload(async (w) => {
    const smallest = JSON.parse(
      (await runCli(["compact", w.logdir, "--keep", "0", "--dry-run", "--json"])).stdout,
    );
    const limitBytes = smallest.logdirBytesAfter + 2048;
    const cutUs = w.history[10].timeUs;
    const run = await runCli([
      "compact",
      w.logdir,
      "--before",
      unixTime(cutUs),
      "--max-bytes",
      String(limitBytes),
      "--json",
    ]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /warning: --max-bytes \d+: moved the cut forward/);
    const summary = JSON.parse(run.stdout);
    assert.deepEqual(summary.maxBytes, { limitBytes, movedCut: true, fits: true });
    assert.ok(summary.cutUs > cutUs && summary.horizonUs > cutUs);
    assert.ok(summary.logdirBytesAfter <= limitBytes);
    assert.ok((await verifyLogdir(w.logdir)).ok);
    const restored = await restoreBytes(w.logdir, summary.horizonUs, w.clock.nowUs);
    assertBytesEqual(restored, expectedAt(w, summary.horizonUs), "restore at the moved cut");
    const tooSmall = await runCli(["compact", w.logdir, "--keep", "0", "--max-bytes", "1K"]);
    assert.equal(tooSmall.code, 0);
    assert.match(tooSmall.stderr, /warning: --max-bytes 1024: the logdir is still \d+ bytes/);
  });
});

Deno.test("sectorlog compact refuses bad arguments with exit 2 naming the argument", async () => {
  await withWorkload(async (w) => {
    const before = filesUnder(w.logdir);
    const cases: [string[], RegExp][] = [
      [["--keep", "7 days"], /Cannot parse duration "7 days"/],
      [[], /give exactly one of --keep DURATION or --before TIME/],
      [["--keep", "1d", "--before", "now"], /give exactly one of/],
      [["--before", "yesterday"], /yesterday/],
      [["--before", "mark:x"], /Invalid --before "mark:x"/],
      [["--keep", "0", "--max-bytes", "lots"], /Invalid --max-bytes "lots"/],
    ];
    for (const [args, message] of cases) {
      const run = await runCli(["compact", w.logdir, ...args]);
      assert.equal(run.code, 2, `${args.join(" ")}: ${run.stderr}`);
      assert.match(run.stderr, message);
    }
    const hook = await runCli(["compact", w.logdir, "--keep", "0"], {
      SECTORLOG_COMPACT_CRASH_AFTER: "never",
    });
    assert.equal(hook.code, 2);
    assert.match(hook.stderr, /SECTORLOG_COMPACT_CRASH_AFTER "never"/);
    const missing = await runCli(["compact", join(w.logdir, "nope"), "--keep", "0"]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /Cannot open logdir/);
    assert.deepEqual(filesUnder(w.logdir), before);
    const help = await runCli(["compact", "--help"]);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /Examples:/);
  });
});

Deno.test("parseSize() reads bytes, binary and decimal units", () => {
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("1K"), 1024);
  assert.equal(parseSize("500MiB"), 500 * 1024 ** 2);
  assert.equal(parseSize("10G"), 10 * 1024 ** 3);
  assert.equal(parseSize("2TB"), 2 * 1000 ** 4);
  assert.equal(parseSize("1.5 GiB"), 1.5 * 1024 ** 3);
  assert.throws(() => parseSize("-1"), /Invalid --max-bytes/);
  assert.throws(() => parseSize("12 parsecs"), /Invalid --max-bytes/);
});
