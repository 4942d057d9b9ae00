import assert from "node:assert/strict";
import { join } from "node:path";
import { readManifest } from "../lib/format/logdir.ts";
import { Receiver } from "../lib/ship/receiver.ts";
import { shipLogdir } from "../lib/ship/sender.ts";
import { readAll, withSeed, withTempDir } from "./_helpers.ts";
import { makeSource } from "./_ship_harness.ts";
import { run } from "./_watch_harness.ts";

const BLOCK_BYTES = 4096;

/** Offsets of a non-zero byte and of a byte inside an all-zero 4 KiB block of `bytes`. */
function dataAndHoleOffsets(bytes: Uint8Array): { data: number; hole: number } {
  const data = bytes.findIndex((byte) => byte !== 0);
  let hole = -1;
  for (let block = 0; block + BLOCK_BYTES <= bytes.length && hole < 0; block += BLOCK_BYTES) {
    if (bytes.subarray(block, block + BLOCK_BYTES).every((byte) => byte === 0)) {
      hole = block + BLOCK_BYTES / 2;
    }
  }
  assert.ok(data >= 0 && hole >= 0, "the source base has data and holes");
  return { data, hole };
}

Deno.test("shipLogdir() returns once the receiver installed a sparse base, and refuses a damaged one", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const source = await makeSource(dir, "vm", random);
      const manifest = await readManifest(source.logdir);
      const base = readAll(join(source.logdir, manifest.base.file));
      const offsets = dataAndHoleOffsets(base);
      const storedir = join(dir, "store");
      const receiver = await Receiver.start({ storedir, port: 0 });
      const target = { hostname: "127.0.0.1", port: receiver.addr.port };
      try {
        for (const [what, offset] of [["data", offsets.data], ["a hole", offsets.hole]] as const) {
          const damaged = join(dir, `damaged-${offset}`);
          assert.equal((await run("cp", ["-a", source.logdir, damaged])).code, 0);
          const file = await Deno.open(join(damaged, manifest.base.file), { write: true });
          await file.seek(offset, Deno.SeekMode.Start);
          await file.write(Uint8Array.of(base[offset] ^ 0x5a));
          file.close();
          await assert.rejects(
            () => shipLogdir(damaged, target, { hostId: "damaged" }),
            (error: Error) => {
              assert.equal(error.name, "IntegrityError", `${what}: ${error}`);
              assert.match(error.message, /does not match its checksum/);
              return true;
            },
          );
        }
        const result = await shipLogdir(source.logdir, target);
        assert.equal(result.statesSent, 1);
        const hostDir = join(storedir, source.hostId);
        assert.ok(
          (await Deno.stat(join(hostDir, "manifest.json"))).isFile,
          "ship returns once the receiver has installed the base",
        );
      } finally {
        await receiver.close();
      }
      const copy = readAll(join(storedir, source.hostId, manifest.base.file));
      assert.ok(copy.length === base.length && copy.every((byte, i) => byte === base[i]));
      const entries = [...Deno.readDirSync(storedir)].map((entry) => entry.name);
      assert.deepEqual(entries, [source.hostId], "a refused base leaves nothing in the store");
    })
  );
});
