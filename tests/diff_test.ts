/** diff: the ranges written between two times equal what a model says was written. */
import assert from "node:assert/strict";
import { diffLogdir } from "../lib/diff.ts";
import { UsageError } from "../lib/errors.ts";
import { withSeed, withTempDir } from "./_helpers.ts";
import { buildHistory, type Phase, timeArg } from "./_past_fixture.ts";
import { runCli } from "./_watch_harness.ts";

const DEVICE_BYTES = 4 * 1024 * 1024 + 512;

/** The union of the ranges phases (from, to] wrote, merged: what diff must report. */
function modelRanges(phases: Phase[], from: number, to: number) {
  const touched = new Uint8Array(DEVICE_BYTES);
  for (const phase of phases.slice(from + 1, to + 1)) {
    for (const range of phase.written) {
      touched.fill(1, range.offsetBytes, range.offsetBytes + range.lengthBytes);
    }
  }
  const ranges: { offsetBytes: number; lengthBytes: number }[] = [];
  for (let i = 0; i < touched.length; i++) {
    if (touched[i] === 0) continue;
    let end = i;
    while (end < touched.length && touched[end] === 1) end++;
    ranges.push({ offsetBytes: i, lengthBytes: end - i });
    i = end;
  }
  return ranges;
}

Deno.test("diffLogdir() between any two phases equals the model's written ranges", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 4,
        opsPerPhase: 8,
        writeBytesMax: 700_000,
        segmentBytesMax: 512 * 1024,
        compactThroughPhase: 1,
      });
      for (let from = 1; from <= 4; from++) {
        for (let to = from; to <= 4; to++) {
          const diff = await diffLogdir(h.logdir, {
            from: { kind: "instant", timeUs: h.phases[from].timeUs },
            to: { kind: "instant", timeUs: h.phases[to].timeUs },
            nowUs: h.clock.nowUs,
          });
          const expected = modelRanges(h.phases, from, to);
          assert.deepEqual(
            diff.ranges.map(({ offsetBytes, lengthBytes }) => ({ offsetBytes, lengthBytes })),
            expected,
            `diff from phase ${from} to ${to}`,
          );
          const ops = h.phases.slice(from + 1, to + 1).flatMap((phase) => phase.written);
          assert.equal(diff.writes + diff.zeroes + diff.trims, ops.length);
          assert.equal(diff.changedBytes, expected.reduce((sum, r) => sum + r.lengthBytes, 0));
          for (const range of diff.ranges) {
            assert.ok(range.lastChangeUs > h.phases[from].timeUs);
            assert.ok(range.lastChangeUs <= h.phases[to].timeUs);
          }
        }
      }
      const latest = await diffLogdir(h.logdir, {
        from: { kind: "instant", timeUs: h.phases[2].timeUs },
        nowUs: h.clock.nowUs,
      });
      assert.deepEqual(
        latest.ranges.map(({ offsetBytes, lengthBytes }) => ({ offsetBytes, lengthBytes })),
        modelRanges(h.phases, 2, 4),
        "diff from phase 2 to the latest state",
      );
    });
  });
});

Deno.test("diffLogdir() is empty when nothing was written between the two times", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 2,
        opsPerPhase: 4,
        writeBytesMax: 100_000,
      });
      // Between the end of a phase (its flush) and the next phase nothing is written.
      const diff = await diffLogdir(h.logdir, {
        from: { kind: "instant", timeUs: h.phases[1].timeUs - 900 },
        to: { kind: "instant", timeUs: h.phases[1].timeUs + 900 },
        nowUs: h.clock.nowUs,
      });
      assert.deepEqual(diff.ranges, []);
      assert.equal(diff.changedBytes, 0);
      assert.equal(diff.writes + diff.zeroes + diff.trims, 0);
    });
  });
});

Deno.test("diffLogdir() refuses times outside the window and a --from after --to", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 2,
        opsPerPhase: 2,
        writeBytesMax: 10_000,
        compactThroughPhase: 1,
      });
      await assert.rejects(
        () =>
          diffLogdir(h.logdir, {
            from: { kind: "instant", timeUs: h.phases[0].timeUs },
            nowUs: h.clock.nowUs,
          }),
        (error: unknown) =>
          error instanceof UsageError && /^Cannot diff --from /.test(error.message) &&
          /restorable window is/.test(error.hint ?? ""),
      );
      await assert.rejects(
        () =>
          diffLogdir(h.logdir, {
            from: { kind: "instant", timeUs: h.phases[2].timeUs },
            to: { kind: "instant", timeUs: h.phases[1].timeUs },
            nowUs: h.clock.nowUs,
          }),
        (error: unknown) =>
          error instanceof UsageError && /--from is after --to/.test(error.message),
      );
    });
  });
});

Deno.test("sectorlog diff: --json lists the ranges; bad times exit 2 with the window", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 2,
        opsPerPhase: 5,
        writeBytesMax: 200_000,
        compactThroughPhase: 1,
      });
      const result = await runCli([
        "diff",
        h.logdir,
        "--from",
        timeArg(h.phases[1].timeUs),
        "--to",
        timeArg(h.phases[2].timeUs),
        "--json",
      ]);
      assert.equal(result.code, 0, result.stderr);
      const json = JSON.parse(result.stdout);
      assert.equal(json.command, "diff");
      assert.deepEqual(
        json.ranges.map((r: { offsetBytes: number; lengthBytes: number }) => ({
          offsetBytes: r.offsetBytes,
          lengthBytes: r.lengthBytes,
        })),
        modelRanges(h.phases, 1, 2),
      );
      assert.equal(json.rangeCount, json.ranges.length);
      const text = await runCli(["diff", h.logdir, "--from", timeArg(h.phases[1].timeUs)]);
      assert.equal(text.code, 0, text.stderr);
      assert.match(text.stderr, /changed \d+ ranges/);
      assert.equal(text.stdout.trim().split("\n").length, json.ranges.length + 1);

      const early = await runCli(["diff", h.logdir, "--from", timeArg(h.phases[0].timeUs)]);
      assert.equal(early.code, 2, early.stderr);
      assert.match(early.stderr, /Cannot diff --from .*earliest restorable time/);
      assert.match(early.stderr, /hint: restorable window is/);
      const garbage = await runCli(["diff", h.logdir, "--from", "yesterday-ish"]);
      assert.equal(garbage.code, 2, garbage.stderr);
      const missing = await runCli(["diff", h.logdir]);
      assert.equal(missing.code, 2, missing.stderr);
      assert.match(missing.stderr, /--from/);
    });
  });
});
