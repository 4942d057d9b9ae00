import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { assertBytesEqual, FakeClock, makeImage, readAll, withTempDir } from "./_helpers.ts";

Deno.test("restoreAt() with stopAtCorruption gives the state just before a corrupt entry", async () => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    const model = await makeImage(device, 1 << 20);
    const clock = new FakeClock();
    await takeSnapshot(device, logdir, { clock: clock.fn });
    const disk = await LogAssistedDisk.open(device, logdir, { clock: clock.fn });
    const states: Uint8Array[] = [];
    for (let i = 0; i < 6; i++) {
      clock.advance(1000);
      const data = new Uint8Array(4096).fill(i + 1);
      await disk.write(i * 8192, data);
      model.set(data, i * 8192);
      states.push(model.slice());
    }
    await disk.close({ seal: true });
    // Corrupt the payload of the 4th write (seq 4): entries are 64 + 4096 bytes each.
    const manifest = await readManifest(logdir);
    const segment = join(logdir, "segments", manifest.segments[0].file);
    const corruptAt = 3 * (64 + 4096) + 64 + 100;
    const bytes = fs.readFileSync(segment);
    bytes[corruptAt] ^= 0xff;
    fs.writeFileSync(segment, bytes);

    await assert.rejects(restoreAt(logdir, join(dir, "strict.img")), IntegrityError);
    assert.equal(fs.existsSync(join(dir, "strict.img")), false, "a failed restore leaves nothing");

    const result = await restoreAt(logdir, join(dir, "partial.img"), { stopAtCorruption: true });
    assert.ok(result.stoppedAtCorruption !== undefined);
    assert.match(result.stoppedAtCorruption.message, /bad payload checksum/);
    assert.equal(result.stoppedAtCorruption.path, segment);
    assert.equal(result.targetSeq, 3);
    assertBytesEqual(readAll(join(dir, "partial.img")), states[2], "state before the corruption");
  });
});
