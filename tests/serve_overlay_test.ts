/** serve --writable-overlay: writes land in a throwaway overlay; the logdir never changes. */
import assert from "node:assert/strict";
import { join } from "node:path";
import { OverlayBackend } from "../lib/overlay.ts";
import { PastView } from "../lib/past_view.ts";
import {
  assertBytesEqual,
  assertTreeUnchanged,
  readAll,
  readTree,
  withSeed,
  withTempDir,
} from "./_helpers.ts";
import { buildHistory, ServeProcess, timeArg } from "./_past_fixture.ts";
import { qemuIo, runOk, skipReason } from "./_watch_harness.ts";

const DEVICE_BYTES = 2 * 1024 * 1024 + 3 * 512;

Deno.test("OverlayBackend: unaligned writes, zeroes and trims over a past view read back like a model", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: DEVICE_BYTES,
        phases: 2,
        opsPerPhase: 6,
        writeBytesMax: 300_000,
      });
      const logdirBefore = await readTree(h.logdir);
      const overlayDir = join(dir, "overlay");
      await Deno.mkdir(overlayDir);
      using view = await PastView.open(h.logdir, {
        at: { kind: "instant", timeUs: h.phases[1].timeUs },
        nowUs: h.clock.nowUs,
      });
      const overlay = OverlayBackend.create(view, overlayDir);
      try {
        assert.deepEqual([...Deno.readDirSync(overlayDir)], [], "the overlay file is unlinked");
        const model = h.phases[1].image.slice();
        const whole = new Uint8Array(DEVICE_BYTES);
        await overlay.read(0, whole);
        assertBytesEqual(whole, model, "before any write");
        for (let op = 0; op < 40; op++) {
          const offset = random.int(0, DEVICE_BYTES - 1);
          const length = random.int(1, Math.min(DEVICE_BYTES - offset, 100_000));
          if (random.int(0, 3) > 0) {
            const data = new Uint8Array(length);
            random.fill(data);
            await overlay.write(offset, data);
            model.set(data, offset);
          } else {
            await (random.int(0, 1) === 0
              ? overlay.zero(offset, length)
              : overlay.trim(offset, length));
            model.fill(0, offset, offset + length);
          }
          const readOffset = random.int(0, DEVICE_BYTES - 1);
          const piece = new Uint8Array(random.int(1, Math.min(DEVICE_BYTES - readOffset, 200_000)));
          await overlay.read(readOffset, piece);
          assertBytesEqual(
            piece,
            model.subarray(readOffset, readOffset + piece.length),
            `read ${readOffset}+${piece.length} after op ${op}`,
          );
        }
        await overlay.read(0, whole);
        assertBytesEqual(whole, model, "whole device after the writes");
        assert.ok(overlay.overlayBytes > 0);
        const untouched = new Uint8Array(DEVICE_BYTES);
        view.readSync(0, untouched);
        assertBytesEqual(untouched, h.phases[1].image, "the view below is unchanged");
      } finally {
        overlay.close();
      }
      await assertTreeUnchanged(h.logdir, logdirBefore, "logdir after overlay writes");
    });
  });
});

const CLI =
  "serve --writable-overlay: qemu-io writes read back, the logdir and overlay dir stay clean";
Deno.test({
  name: CLI,
  ignore: skipReason(CLI, ["qemu-io", "nbdcopy"]) !== undefined,
  fn: () =>
    withSeed((random) =>
      withTempDir(async (dir) => {
        const h = await buildHistory(dir, random, {
          deviceBytes: 4 * 1024 * 1024,
          phases: 2,
          opsPerPhase: 5,
          writeBytesMax: 500_000,
          alignBytes: 512,
        });
        const logdirBefore = await readTree(h.logdir);
        const overlayDir = join(dir, "overlay");
        await Deno.mkdir(overlayDir);
        const serve = await ServeProcess.start(h.logdir, join(dir, "serve.sock"), [
          "--at",
          timeArg(h.phases[1].timeUs),
          "--writable-overlay",
          overlayDir,
        ]);
        try {
          assert.match(serve.process.output, /writable \(overlay in /);
          await qemuIo(serve.uri, ["write -P 0x5a 1000 70000", "write -z 200000 4096", "flush"]);
          await qemuIo(serve.uri, ["read -P 0x5a 1000 70000", "read -P 0 200000 4096"], {
            readOnly: true,
          });
          const model = h.phases[1].image.slice();
          model.fill(0x5a, 1000, 71000);
          model.fill(0, 200000, 204096);
          const copied = join(dir, "copied.img");
          await runOk("nbdcopy", [serve.uri, copied]);
          assertBytesEqual(readAll(copied), model, "export with the overlay's writes");
          await serve.stop();
        } finally {
          await serve.close();
        }
        assert.deepEqual([...Deno.readDirSync(overlayDir)], [], "nothing left in the overlay dir");
        await assertTreeUnchanged(h.logdir, logdirBefore, "logdir after serve with an overlay");
      })
    ),
});
