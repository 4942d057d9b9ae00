import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { COMPACT_STEPS, compactLogdir } from "../lib/compact.ts";
import { LEVELS_DIR, readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { nextSeqAfterSealed } from "../lib/format/manifest.ts";
import { parseSegmentFileName } from "../lib/format/segment.ts";
import { verifyLogdir } from "../lib/verify.ts";
import {
  appendSteps,
  expectedAt,
  makeWorkload,
  restoreBytes,
  runCli,
  type Workload,
} from "./_compact_fixture.ts";
import { assertBytesEqual, withSeed, withTempDir } from "./_helpers.ts";

/** `@<seconds>.<micros>`: a TIME that names `timeUs` exactly. */
function unixTime(timeUs: number): string {
  return `@${Math.floor(timeUs / 1e6)}.${String(timeUs % 1e6).padStart(6, "0")}`;
}

/** A cut inside a sealed segment (its first entry folds, its last does not): a straddle. */
async function straddlingCut(logdir: string): Promise<number> {
  const manifest = await readManifest(logdir);
  const candidates = manifest.segments.filter((s) =>
    s.lastUs > s.firstUs && s.firstUs > manifest.horizonUs
  );
  assert.ok(candidates.length > 0, "the workload has a segment a cut can fall inside");
  return candidates[Math.floor(candidates.length / 2)].firstUs;
}

async function checkRestores(w: Workload, fromUs: number): Promise<void> {
  const nowUs = w.clock.nowUs;
  for (const timeUs of [fromUs, Math.floor((fromUs + nowUs) / 2), nowUs]) {
    const restored = await restoreBytes(w.logdir, timeUs, nowUs);
    assertBytesEqual(restored, expectedAt(w, timeUs), `restore at ${timeUs}`);
  }
}

/** Every level and sealed-range segment file is named by the manifest; no temporary files. */
async function checkNoLeftovers(logdir: string): Promise<void> {
  const manifest = await readManifest(logdir);
  const levels = new Set(manifest.levels.map((level) => level.file));
  assert.deepEqual(fs.readdirSync(join(logdir, LEVELS_DIR)).sort(), [...levels].sort());
  const segments = new Set(manifest.segments.map((segment) => segment.file));
  for (const name of fs.readdirSync(join(logdir, SEGMENTS_DIR))) {
    const firstSeq = parseSegmentFileName(name);
    assert.ok(firstSeq !== undefined, `unexpected file ${name}`);
    assert.ok(segments.has(name) || firstSeq >= nextSeqAfterSealed(manifest), `leftover ${name}`);
  }
}

Deno.test("compact killed after every step leaves the old or the new state, and the next run finishes", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const w = await makeWorkload(dir, random);
      await appendSteps(w, random, 60, { overwriteHot: true });
      await compactLogdir(w.logdir, { cutUs: w.history[20].timeUs, nowUs: w.clock.nowUs });
      await appendSteps(w, random, 80, { overwriteHot: true }); // a level, then more entries
      const oldHorizonUs = (await readManifest(w.logdir)).horizonUs;
      const cutUs = await straddlingCut(w.logdir);
      const template = join(dir, "template");
      fs.cpSync(w.logdir, template, { recursive: true });
      for (const [index, step] of COMPACT_STEPS.entries()) {
        fs.rmSync(w.logdir, { recursive: true });
        fs.cpSync(template, w.logdir, { recursive: true });
        const run = await runCli(["compact", w.logdir, "--before", unixTime(cutUs)], {
          SECTORLOG_COMPACT_CRASH_AFTER: String(index + 1),
        });
        assert.equal(run.signal, "SIGKILL", `killed after ${step}: ${run.stderr}`);
        const verified = await verifyLogdir(w.logdir);
        assert.ok(
          verified.ok,
          `verify after a crash at ${step}: ${JSON.stringify(verified.problems)}`,
        );
        const { horizonUs } = await readManifest(w.logdir);
        const swapped = index >= COMPACT_STEPS.indexOf("manifest-swapped");
        assert.equal(horizonUs, swapped ? cutUs : oldHorizonUs, `state after a crash at ${step}`);
        await checkRestores(w, swapped ? cutUs : Math.floor((oldHorizonUs + cutUs) / 2));
        const rerun = await compactLogdir(w.logdir, { cutUs, nowUs: w.clock.nowUs });
        assert.equal(rerun.changed, !swapped, `the next run after a crash at ${step}`);
        const leftBehind = step !== "sealed" && step !== "old-files-removed";
        assert.equal(rerun.removedLeftovers.length > 0, leftBehind, `leftovers of ${step}`);
        assert.ok((await verifyLogdir(w.logdir)).ok);
        assert.equal((await readManifest(w.logdir)).horizonUs, cutUs);
        await checkRestores(w, cutUs);
        await checkNoLeftovers(w.logdir);
      }
    });
  });
});
