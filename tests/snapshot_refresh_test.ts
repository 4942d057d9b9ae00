import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../lib/errors.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { listEntries } from "../lib/timeline.ts";
import { startWatch } from "../lib/watch.ts";
import { assertBytesEqual, makeImage, readAll, withSeed, withTempDir } from "./_helpers.ts";

const DEVICE_BYTES = 96 * 1024 * 1024; // big enough that the copy yields while writes go on

Deno.test("snapshot --refresh while watch appends gives a base that restores exactly after the copy", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      const model = await makeImage(
        device,
        DEVICE_BYTES,
        (b) => random.fill(b.subarray(0, 1 << 20)),
      );
      await takeSnapshot(device, logdir);
      const watch = await startWatch(device, logdir, {
        listen: { path: join(dir, "nbd.sock") },
        segmentBytesMax: 1024 * 1024,
      });
      const states: { timeUs: number; image: Uint8Array }[] = [];
      try {
        const writeSome = async (count: number) => {
          for (let i = 0; i < count; i++) {
            const offset = random.int(0, DEVICE_BYTES / 4096 - 64) * 4096;
            const data = new Uint8Array(random.int(1, 64) * 4096);
            random.fill(data.subarray(0, 64));
            await watch.disk.write(offset, data);
            model.set(data, offset);
            await new Promise((r) => setTimeout(r, 0));
          }
        };
        await writeSome(40);
        // Writes go on while the new base is copied.
        const [refresh] = await Promise.all([
          takeSnapshot(device, logdir, { refresh: true }),
          writeSome(200),
        ]);
        await watch.disk.flush();
        const afterUs = watch.disk.writer!.lastTimeUs;
        states.push({ timeUs: afterUs, image: model.slice() });
        await writeSome(20);
        await watch.disk.flush();
        states.push({ timeUs: watch.disk.writer!.lastTimeUs, image: model.slice() });
        const manifest = await readManifest(logdir);
        assert.equal(manifest.base.file, refresh.baseFile);
        assert.equal(manifest.horizonUs, refresh.endedUs);
        assert.ok(refresh.replayFromSeq > 1, "the new base replays from after the old entries");
        let duringCopy = 0;
        for await (const e of listEntries(logdir, manifest)) {
          if (e.kind === "write" && e.timeUs <= refresh.endedUs) duringCopy++;
        }
        assert.ok(duringCopy > 0, "some writes were journaled while the copy ran");
        assert.ok(manifest.segments.length > 0, "segments sealed during the copy are kept");
        await assert.rejects(
          restoreAt(logdir, join(dir, "early.img"), {
            at: { kind: "instant", timeUs: refresh.startedUs },
          }),
          UsageError,
        );
      } finally {
        await watch.stop();
      }
      for (const [i, state] of states.entries()) {
        const out = join(dir, `r${i}.img`);
        await restoreAt(logdir, out, { at: { kind: "instant", timeUs: state.timeUs } });
        assertBytesEqual(readAll(out), state.image, `restore ${i} after the refresh`);
      }
      assertBytesEqual(readAll(device), model, "device");
    });
  });
});
