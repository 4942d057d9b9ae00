import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { dataExtents } from "../lib/data_extents.ts";
import { withTempDir } from "./_helpers.ts";

Deno.test("dataExtents() finds the data of a sparse file and skips its holes", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "sparse.img");
    const sizeBytes = 64 * 1024 * 1024;
    await Deno.writeFile(path, new Uint8Array(0));
    await Deno.truncate(path, sizeBytes);
    const fd = fs.openSync(path, "r+");
    const block = new Uint8Array(1024 * 1024).fill(7);
    fs.writeSync(fd, block, 0, block.length, 8 * 1024 * 1024);
    fs.writeSync(fd, block, 0, block.length, 40 * 1024 * 1024);
    fs.closeSync(fd);
    const extents = [...dataExtents(path, sizeBytes)];
    // Filesystems may round extents to their block size, but must cover the data and skip most
    // of the holes.
    const covered = (offset: number) =>
      extents.some((e) => e.offsetBytes <= offset && offset < e.offsetBytes + e.lengthBytes);
    assert.ok(covered(8 * 1024 * 1024) && covered(9 * 1024 * 1024 - 1));
    assert.ok(covered(40 * 1024 * 1024) && covered(41 * 1024 * 1024 - 1));
    const total = extents.reduce((sum, e) => sum + e.lengthBytes, 0);
    assert.ok(total < sizeBytes / 2, `extents cover ${total} of ${sizeBytes} bytes`);
    for (let i = 1; i < extents.length; i++) {
      assert.ok(extents[i].offsetBytes >= extents[i - 1].offsetBytes + extents[i - 1].lengthBytes);
    }
  });
});

Deno.test("dataExtents() of a file with no holes is one extent", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "full.img");
    await Deno.writeFile(path, new Uint8Array(100_000).fill(1));
    assert.deepEqual([...dataExtents(path, 100_000)], [{ offsetBytes: 0, lengthBytes: 100_000 }]);
  });
});
