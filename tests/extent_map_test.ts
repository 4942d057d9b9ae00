import assert from "node:assert/strict";
import { ENTRY_HEADER_BYTES } from "../lib/format/entry.ts";
import {
  type Extent,
  ExtentMap,
  LEVEL_WRITE_BYTES_MAX,
  levelRuns,
  measureLevel,
} from "../lib/extent_map.ts";
import { withSeed } from "./_helpers.ts";

/** What a byte of the device reads back as: -1 for zero, else a unique source byte position. */
function resolve(map: ExtentMap, deviceBytes: number): Int32Array {
  const bytes = new Int32Array(deviceBytes).fill(-2); // -2: untouched
  let previousEnd = 0;
  for (const extent of map.extents()) {
    assert.ok(extent.offsetBytes >= previousEnd, "extents are sorted and disjoint");
    assert.ok(extent.lengthBytes > 0, "no empty extents");
    const bucket = Math.floor(extent.offsetBytes / map.bucketBytes);
    assert.ok(
      extent.offsetBytes + extent.lengthBytes <= (bucket + 1) * map.bucketBytes,
      "no extent crosses a bucket",
    );
    previousEnd = extent.offsetBytes + extent.lengthBytes;
    for (let i = 0; i < extent.lengthBytes; i++) {
      bytes[extent.offsetBytes + i] = extent.kind === "zero" ? -1 : extent.sourceOffsetBytes + i;
    }
  }
  return bytes;
}

function dataExtent(offsetBytes: number, lengthBytes: number, sourceOffsetBytes: number): Extent {
  return {
    offsetBytes,
    lengthBytes,
    kind: "data",
    timeUs: sourceOffsetBytes,
    sourceIndex: 0,
    entryOffsetBytes: sourceOffsetBytes - ENTRY_HEADER_BYTES,
    sourceOffsetBytes,
  };
}

Deno.test("ExtentMap.set() leaves the latest state of every byte for random overlapping ranges", async () => {
  await withSeed(async (random) => {
    const deviceBytes = 20_000 + random.int(0, 5000);
    const map = new ExtentMap(deviceBytes, 1024); // small buckets: many boundary crossings
    const model = new Int32Array(deviceBytes).fill(-2);
    let sourceOffset = 1_000_000; // distinct source positions per write
    for (let step = 0; step < 600; step++) {
      const offset = random.int(0, deviceBytes - 1);
      const length = random.int(
        1,
        Math.min(deviceBytes - offset, random.int(0, 3) === 0 ? 8000 : 300),
      );
      if (random.int(0, 3) === 0) {
        map.set({ ...dataExtent(offset, length, 0), kind: "zero", sourceOffsetBytes: 0 });
        model.fill(-1, offset, offset + length);
      } else {
        map.set(dataExtent(offset, length, sourceOffset));
        for (let i = 0; i < length; i++) model[offset + i] = sourceOffset + i;
        sourceOffset += length;
      }
    }
    assert.deepEqual(resolve(map, deviceBytes), model);
    let dataBytes = 0;
    let zeroBytes = 0;
    for (const value of model) {
      if (value === -1) zeroBytes++;
      else if (value >= 0) dataBytes++;
    }
    assert.equal(map.dataBytes, dataBytes);
    assert.equal(map.zeroBytes, zeroBytes);
    assert.equal([...map.extents()].length, map.extentCount);
    await Promise.resolve();
  });
});

Deno.test("levelRuns() merges adjacent extents of one kind within the entry limits", () => {
  const map = new ExtentMap(8 * 1024 * 1024);
  map.set(dataExtent(0, 3 * 1024 * 1024, 64)); // one 3 MiB write: three bucket pieces
  map.set(dataExtent(3 * 1024 * 1024, 4096, 10_000_000)); // adjacent, another source range
  map.set({ ...dataExtent(5 * 1024 * 1024, 2 * 1024 * 1024, 0), kind: "zero" });
  const runs = [...levelRuns(map)];
  assert.deepEqual(
    runs.map((run) => [run.kind, run.offsetBytes, run.lengthBytes]),
    [
      ["data", 0, LEVEL_WRITE_BYTES_MAX],
      ["data", 1024 * 1024, LEVEL_WRITE_BYTES_MAX],
      ["data", 2 * 1024 * 1024, LEVEL_WRITE_BYTES_MAX],
      ["data", 3 * 1024 * 1024, 4096],
      ["zero", 5 * 1024 * 1024, 2 * 1024 * 1024],
    ],
  );
  const measured = measureLevel(map);
  assert.equal(measured.entries, 5);
  assert.equal(measured.sizeBytes, 5 * ENTRY_HEADER_BYTES + 3 * 1024 * 1024 + 4096);
  assert.ok(measured.sizeBytes <= map.encodedBytesMax);
});

Deno.test("levelRuns() merges sector-sized neighbours into one entry", () => {
  const map = new ExtentMap(1024 * 1024);
  for (let i = 0; i < 64; i++) map.set(dataExtent(i * 512, 512, 100_000 * (i + 1)));
  const runs = [...levelRuns(map)];
  assert.equal(runs.length, 1);
  assert.equal(runs[0].pieces.length, 64);
  assert.equal(runs[0].lengthBytes, 64 * 512);
  assert.equal(runs[0].timeUs, 100_000 * 64);
});

Deno.test("ExtentMap.set() splits one extent in three when a write lands inside it", () => {
  const map = new ExtentMap(4096);
  map.set(dataExtent(0, 4096, 64));
  map.set({ ...dataExtent(1000, 100, 0), kind: "zero" });
  assert.deepEqual(
    [...map.extents()].map((e) => [e.kind, e.offsetBytes, e.lengthBytes, e.sourceOffsetBytes]),
    [["data", 0, 1000, 64], ["zero", 1000, 100, 0], ["data", 1100, 2996, 1164]],
  );
});
