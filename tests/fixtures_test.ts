/**
 * Logdirs written by earlier versions of sectorlog (fixtures/logdir/<case>/) must stay readable:
 * these tests restore them and compare with models built here, independently of the writer.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { restoreAt } from "../lib/restore.ts";
import { readTimeline } from "../lib/timeline.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { assertBytesEqual, readAll, withTempDir } from "./_helpers.ts";

const FIXTURE = new URL("../fixtures/logdir/format-v1-basic/", import.meta.url).pathname;

/** The device after each seq of the fixture (scripts/make_fixtures.ts wrote those steps). */
function modelStates(): Map<number, Uint8Array> {
  const image = new Uint8Array(64 * 1024);
  for (let i = 0; i < 4096; i++) image[i] = i % 251;
  const states = new Map<number, Uint8Array>([[0, image.slice()]]);
  const steps: ((bytes: Uint8Array) => void)[] = [
    (b) => b.fill(0x11, 8192, 8192 + 4096), // 1 write
    (b) => b.fill(0x22, 8192 + 100, 8192 + 110), // 2 write
    () => {}, // 3 flush
    () => {}, // 4 mark before-zero
    (b) => b.fill(0, 0, 2048), // 5 zero
    (b) => b.fill(0, 16384, 16384 + 4096), // 6 trim
    (b) => b.fill(0x33, 65536 - 512, 65536), // 7 write
    () => {}, // 8 flush
  ];
  steps.forEach((apply, index) => {
    apply(image);
    states.set(index + 1, image.slice());
  });
  return states;
}

Deno.test("a format-v1 logdir from fixtures/ verifies and restores every seq exactly", async () => {
  const logdir = join(FIXTURE, "logdir");
  const verified = await verifyLogdir(logdir);
  assert.deepEqual(verified.problems, []);
  assert.equal(verified.lastSeq, 8);
  const timeline = await readTimeline(logdir);
  assert.deepEqual(timeline.marks.map((m) => [m.name, m.seq, m.restorable]), [
    ["before-zero", 4, true],
  ]);
  assert.equal(timeline.flushes, 2);
  await withTempDir(async (dir) => {
    for (const [seq, expected] of modelStates()) {
      const output = join(dir, `seq-${seq}.img`);
      await restoreAt(logdir, output, { at: { kind: "seq", seq } });
      assertBytesEqual(readAll(output), expected, `restore at seq:${seq}`);
    }
    const atMark = join(dir, "mark.img");
    await restoreAt(logdir, atMark, { at: { kind: "mark", name: "before-zero" } });
    assertBytesEqual(readAll(atMark), modelStates().get(4)!, "restore at mark:before-zero");
    const latest = join(dir, "latest.img");
    await restoreAt(logdir, latest);
    assertBytesEqual(readAll(latest), readAll(join(FIXTURE, "device.img")), "the device");
  });
});
