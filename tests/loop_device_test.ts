import assert from "node:assert/strict";
import { join } from "node:path";
import { Device } from "../lib/device.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { UsageError } from "../lib/errors.ts";
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

/** Not a power of two, but a whole number of sectors as a loop device needs. */
const DEVICE_BYTES = 4 * 1024 * 1024 + 3 * 512;

/** Why loop device tests cannot run here, or undefined when they can. */
async function whyNoLoopDevices(): Promise<string | undefined> {
  if (Deno.build.os !== "linux") return "loop devices are Linux only";
  if (Deno.uid() !== 0) return "they need root to attach loop devices";
  try {
    const probe = await new Deno.Command("losetup", {
      args: ["--find"],
      stdout: "piped",
      stderr: "piped",
    })
      .output();
    if (!probe.success) {
      return `losetup --find failed: ${new TextDecoder().decode(probe.stderr).trim()}`;
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "losetup is not installed";
    throw error;
  }
  return undefined;
}

const skipReason = await whyNoLoopDevices();
if (skipReason !== undefined) console.log(`loop_device_test.ts skipped: ${skipReason}`);

async function losetup(args: string[]): Promise<string> {
  const result = await new Deno.Command("losetup", { args, stdout: "piped", stderr: "piped" })
    .output();
  const stderr = new TextDecoder().decode(result.stderr).trim();
  assert.ok(result.success, `losetup ${args.join(" ")} failed: ${stderr}`);
  return new TextDecoder().decode(result.stdout).trim();
}

/** Attaches `imagePath` to a free loop device for the duration of `body`, detaching it after. */
async function withLoopDevice<T>(imagePath: string, body: (device: string) => Promise<T>) {
  const device = await losetup(["--find", "--show", imagePath]);
  assert.match(device, /^\/dev\/loop\d+$/);
  try {
    return await body(device);
  } finally {
    await losetup(["-d", device]);
  }
}

/** Reads a whole block device (its stat size is 0, so readFile cannot). */
async function readDevice(path: string): Promise<Uint8Array> {
  const device = await Device.open(path, { readOnly: true });
  try {
    const bytes = new Uint8Array(device.sizeBytes);
    device.readInto(0, bytes);
    return bytes;
  } finally {
    device.close();
  }
}

Deno.test({
  name: "snapshot, LogAssistedDisk writes and restore work on loop devices",
  ignore: skipReason !== undefined,
  fn: async () => {
    await withSeed(async (random) => {
      await withTempDir(async (dir) => {
        const sourceImage = join(dir, "source.img");
        const targetImage = join(dir, "target.img");
        const logdir = join(dir, "log");
        const model = await makeImage(sourceImage, DEVICE_BYTES, (bytes) => {
          random.fill(bytes.subarray(0, 512 * 1024));
          random.fill(bytes.subarray(DEVICE_BYTES - 4096));
        });
        // The target starts as garbage, so a restore that skipped a hole would show.
        await makeImage(targetImage, DEVICE_BYTES, (bytes) => bytes.fill(0xee));
        const clock = new FakeClock();
        let atMark: Uint8Array | undefined;
        await withLoopDevice(sourceImage, async (source) => {
          const snapshot = await takeSnapshot(source, logdir, { clock: clock.fn });
          assert.equal(snapshot.deviceBytes, DEVICE_BYTES, "the block device's size");
          const disk = await LogAssistedDisk.open(source, logdir, { clock: clock.fn });
          try {
            assert.ok(disk.device.isBlockDevice);
            for (let step = 0; step < 60; step++) {
              clock.advance(1000);
              const offset = random.int(0, DEVICE_BYTES - 1);
              const length = random.int(1, Math.min(DEVICE_BYTES - offset, 256 * 1024));
              if (step % 5 === 4) {
                await disk.trim(offset, length);
                model.fill(0, offset, offset + length);
              } else {
                const data = new Uint8Array(length);
                random.fill(data);
                await disk.write(offset, data);
                model.set(data, offset);
              }
              if (step === 30) {
                await disk.flush();
                await disk.mark("halfway");
                atMark = model.slice();
              }
            }
            await disk.write(DEVICE_BYTES - 512, new Uint8Array(512).fill(0x77)); // the last sector
            model.fill(0x77, DEVICE_BYTES - 512);
          } finally {
            await disk.close();
          }
          assertBytesEqual(await readDevice(source), model, "the source loop device");
        });
        assertBytesEqual(readAll(sourceImage), model, "the source image after detaching");

        await withLoopDevice(targetImage, async (target) => {
          await assert.rejects(restoreAt(logdir, target, { nowUs: clock.nowUs }), UsageError);
          await restoreAt(logdir, target, {
            at: { kind: "mark", name: "halfway" },
            force: true,
            nowUs: clock.nowUs,
          });
          assertBytesEqual(await readDevice(target), atMark!, "the target restored at the mark");
          const result = await restoreAt(logdir, target, { force: true, nowUs: clock.nowUs });
          assert.equal(result.deviceBytes, DEVICE_BYTES);
          assertBytesEqual(await readDevice(target), model, "the target restored at the latest");
        });
        assertBytesEqual(readAll(targetImage), model, "the target image after detaching");
      });
    });
  },
});

// Runs everywhere: the geometry edge the loop device test first caught, on an image file.
Deno.test("takeSnapshot() and restoreAt() keep data in a device's last partial 4 KiB block", async () => {
  await withTempDir(async (dir) => {
    const devicePath = join(dir, "disk.img");
    const logdir = join(dir, "log");
    const image = await makeImage(devicePath, 65536 + 1536, (bytes) => {
      bytes.fill(0x11, 65536 + 100, 65536 + 200); // only in the last, 1536-byte block
    });
    const clock = new FakeClock();
    const snapshot = await takeSnapshot(devicePath, logdir, { clock: clock.fn });
    assert.equal(snapshot.dataBytes, 1536);
    const output = join(dir, "restored.img");
    await restoreAt(logdir, output, { nowUs: clock.nowUs });
    assertBytesEqual(readAll(output), image, "the restored image");
  });
});
