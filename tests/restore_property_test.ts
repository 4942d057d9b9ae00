import assert from "node:assert/strict";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import {
  assertBytesEqual,
  FakeClock,
  makeImage,
  readAll,
  withSeed,
  withTempDir,
} from "./_helpers.ts";

const DEVICE_BYTES = 1024 * 1024 + 3 * 512; // not a power of two: device-end edges matter

Deno.test("restoreAt() equals the model image at every time for random write/zero/trim workloads", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const devicePath = join(dir, "disk.img");
      const logdir = join(dir, "log");
      const model = await makeImage(
        devicePath,
        DEVICE_BYTES,
        (b) => random.fill(b.subarray(0, 65536)),
      );
      const clock = new FakeClock();
      await takeSnapshot(devicePath, logdir, { clock: clock.fn });
      const disk = await LogAssistedDisk.open(devicePath, logdir, {
        clock: clock.fn,
        segmentBytesMax: 256 * 1024, // many segments, many seals
      });
      const snapshots: { timeUs: number; image: Uint8Array }[] = [];
      snapshots.push({ timeUs: clock.nowUs, image: model.slice() });
      for (let step = 0; step < 120; step++) {
        clock.advance(random.int(0, 3) * 1000); // equal times happen too
        const offset = random.int(0, DEVICE_BYTES - 1);
        const length = random.int(1, Math.min(DEVICE_BYTES - offset, 200_000));
        const kind = random.int(0, 9);
        if (kind < 6) {
          const data = new Uint8Array(length);
          random.fill(data);
          await disk.write(offset, data);
          model.set(data, offset);
        } else if (kind < 8) {
          await disk.zero(offset, length);
          model.fill(0, offset, offset + length);
        } else if (kind === 8) {
          await disk.trim(offset, length);
          model.fill(0, offset, offset + length);
        } else {
          await disk.flush();
        }
        snapshots.push({ timeUs: clock.nowUs, image: model.slice() });
      }
      await disk.close();
      // The state at time T is the one after the last step with time <= T.
      const checks = [...Array(12)].map(() => snapshots[random.int(0, snapshots.length - 1)]);
      checks.push(snapshots[0], snapshots.at(-1)!);
      for (const [i, check] of checks.entries()) {
        const expected = snapshots.findLast((s) => s.timeUs <= check.timeUs)!;
        const output = join(dir, `restore-${i}.img`);
        await restoreAt(logdir, output, {
          at: { kind: "instant", timeUs: check.timeUs },
          nowUs: clock.nowUs,
        });
        assertBytesEqual(readAll(output), expected.image, `restore at ${check.timeUs}`);
      }
      const latest = join(dir, "latest.img");
      await restoreAt(logdir, latest, { nowUs: clock.nowUs });
      assertBytesEqual(readAll(latest), model, "restore of the latest state");
      assertBytesEqual(readAll(devicePath), model, "the device itself");
    });
  });
});

Deno.test("restoreAt() refuses a time before the horizon with the window in the hint", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    await makeImage(devicePath, 65536);
    const clock = new FakeClock();
    await takeSnapshot(devicePath, join(dir, "log"), { clock: clock.fn });
    await assert.rejects(
      restoreAt(join(dir, "log"), join(dir, "out.img"), {
        at: { kind: "instant", timeUs: clock.nowUs - 1_000_000 },
      }),
      (error: Error & { hint?: string }) => {
        assert.match(error.message, /earliest restorable time is/);
        assert.match(error.hint ?? "", /restorable window is/);
        return true;
      },
    );
  });
});
