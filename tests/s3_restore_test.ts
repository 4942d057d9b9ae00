/**
 * `restore s3://…` through restoreFromStore(): ranged GETs of only what the point needs, the base
 * streamed into the output, retries on a swapped manifest. Against a real single-node Swift
 * (tests/s3/swift.sh; skipped with the reason when Swift is not installed).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import { readManifest } from "../lib/format/logdir.ts";
import type { Manifest } from "../lib/format/manifest.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import type {
  ByteRange,
  ConditionalPutResult,
  ObjectInfo,
  ObjectStore,
  PutCondition,
  PutFileOptions,
} from "../lib/store/object_store.ts";
import { compactStore } from "../lib/store/store_compact.ts";
import { GET_PART_BYTES } from "../lib/store/store_copy.ts";
import {
  baseObjectName,
  readStoreManifest,
  segmentObjectName,
  shipToStore,
  type StoreLogdir,
} from "../lib/store/store_logdir.ts";
import { restoreFromStore } from "../lib/store/store_restore.ts";
import { formatTimeUtc } from "../lib/time.ts";
import { appendSteps, expectedAt, makeWorkload, type Workload } from "./_compact_fixture.ts";
import { assertBytesEqual, FakeClock, Random, readAll, testSeed, withTempDir } from "./_helpers.ts";
import { type SwiftNode, swiftTest } from "./_s3_harness.ts";
import { runCli } from "./_watch_harness.ts";

const TEST_NAME = "restore from s3:// with ranged GETs against a real Swift node";
const BUCKET = "restore";
/** Small parts, so that the small test devices span many parts and end in a partial one. */
const SMALL_PART_BYTES = 64 * 1024;

swiftTest(TEST_NAME, { bucket: BUCKET }, async (t, swift) => {
  const store = swift.store(BUCKET);
  try {
    await runSteps(t, swift, store);
  } finally {
    store.close();
  }
});

async function runSteps(t: Deno.TestContext, swift: SwiftNode, store: ObjectStore) {
  await t.step(
    "restoreFromStore() at several times equals the local restore and fetches no segment after the point",
    () => withTempDir((dir) => restoresMatchLocal(store, dir)),
  );
  await t.step(
    "a sparse base of several default-size parts, the device size not a multiple of a part",
    () => withTempDir((dir) => largeSparseBase(store, dir)),
  );
  await t.step(
    "sectorlog restore s3:// --json reports objects, bytes and segments listed vs fetched",
    () => withTempDir((dir) => cliReportsDownloads(swift, store, dir)),
  );
  await t.step(
    "a missing object is an integrity error naming it: exit 3, one line, no output",
    () => withTempDir((dir) => missingObject(swift, store, dir)),
  );
  await t.step(
    "a corrupted base object fails the CRC32C check and leaves no output file",
    () => withTempDir((dir) => corruptedBase(store, dir)),
  );
  await t.step(
    "a manifest swapped by a compaction mid-restore: the restore starts over and succeeds",
    () => withTempDir((dir) => swappedManifestRetries(store, dir)),
  );
}

/** A workload with `steps` steps shipped to `prefix`, and its (sealed) local manifest. */
async function shippedWorkload(
  store: ObjectStore,
  dir: string,
  prefix: string,
  steps: number,
): Promise<{ w: Workload; source: StoreLogdir; manifest: Manifest; seed: number }> {
  const seed = testSeed();
  const random = new Random(seed);
  const w = await makeWorkload(dir, random);
  await appendSteps(w, random, steps);
  const source = { store, prefix };
  await shipToStore(w.logdir, source);
  return { w, source, manifest: await readManifest(w.logdir), seed };
}

async function restoresMatchLocal(store: ObjectStore, dir: string): Promise<void> {
  const { w, source, manifest, seed } = await shippedWorkload(store, dir, "match/vm1", 150);
  assert.ok(manifest.segments.length >= 4, `[seed ${seed}] several segments to choose from`);
  const nowUs = Date.now() * 1000;
  for (const index of [0, 1, 30, 75, 120, w.history.length - 1]) {
    const timeUs = w.history[index].timeUs;
    const output = join(dir, `s3-${index}.img`);
    const local = join(dir, `local-${index}.img`);
    const at = { kind: "instant" as const, timeUs };
    const progress: [number, number][] = [];
    const result = await restoreFromStore(source, output, {
      at,
      nowUs,
      partBytes: SMALL_PART_BYTES,
      onProgress: (done, total) => progress.push([done, total]),
    });
    await restoreAt(w.logdir, local, { at, nowUs });
    const what = `[seed ${seed}] step ${index}`;
    assertBytesEqual(readAll(output), readAll(local), `${what}: s3 vs local`);
    assertBytesEqual(readAll(output), expectedAt(w, timeUs), `${what}: model`);
    // Only the segments that begin at or before the point come down, and the base once.
    const needed = manifest.segments.filter((segment) => segment.firstUs <= timeUs);
    assert.deepEqual(
      [result.segmentsListed, result.segmentsFetched, result.objectsDownloaded, result.attempts],
      [manifest.segments.length, needed.length, 1 + needed.length, 1],
      what,
    );
    const segmentBytes = needed.reduce((sum, segment) => sum + segment.sizeBytes, 0);
    assert.deepEqual(result.bytesDownloaded, manifest.deviceBytes + segmentBytes, what);
    // Progress covers the download and the restore, and ends at its total.
    assert.ok(progress.length > 0, what);
    const [lastDone, lastTotal] = progress.at(-1)!;
    assert.ok(lastDone <= lastTotal && lastDone >= segmentBytes + manifest.deviceBytes, what);
  }
  const early = manifest.segments.filter((s) => s.firstUs <= w.history[30].timeUs).length;
  assert.ok(early < manifest.segments.length, `[seed ${seed}] an early point needs fewer`);
  // seq:N and the latest state give the local restore too.
  for (const at of [{ kind: "seq" as const, seq: 42 }, undefined]) {
    const output = join(dir, `s3-${at?.seq ?? "latest"}.img`);
    const local = join(dir, `local-${at?.seq ?? "latest"}.img`);
    const result = await restoreFromStore(source, output, { at, nowUs });
    await restoreAt(w.logdir, local, { at, nowUs });
    assertBytesEqual(readAll(output), readAll(local), `[seed ${seed}] ${at?.seq ?? "latest"}`);
    const fetched = at === undefined
      ? manifest.segments.length
      : manifest.segments.filter((segment) => segment.firstSeq <= at.seq).length;
    assert.deepEqual(result.segmentsFetched, fetched);
  }
}

async function largeSparseBase(store: ObjectStore, dir: string): Promise<void> {
  // Two full default parts and a partial third; data only here and there, the rest holes.
  const deviceBytes = 2 * GET_PART_BYTES + 12 * 1024 + 512;
  const devicePath = join(dir, "big.img");
  const logdir = join(dir, "log");
  const model = new Uint8Array(deviceBytes);
  const random = new Random(testSeed());
  for (const offset of [0, GET_PART_BYTES - 2048, GET_PART_BYTES + 5 * 4096, deviceBytes - 700]) {
    random.fill(model.subarray(offset, offset + 700));
  }
  writeSparse(devicePath, model);
  const clock = new FakeClock();
  await takeSnapshot(devicePath, logdir, { clock: clock.fn, hostId: "big" });
  const disk = await LogAssistedDisk.open(devicePath, logdir, { clock: clock.fn });
  const times: number[] = [];
  for (const offset of [4096, 2 * GET_PART_BYTES, deviceBytes - 512]) {
    clock.advance(1000);
    const data = new Uint8Array(512);
    random.fill(data);
    await disk.write(offset, data);
    await disk.flush();
    times.push(clock.nowUs);
  }
  await disk.close();
  const source = { store, prefix: "big/vm1" };
  await shipToStore(logdir, source);
  for (const timeUs of [times[0] - 1, times[1], times[2]]) {
    const at = { kind: "instant" as const, timeUs };
    const output = join(dir, `s3-${timeUs}.img`);
    const local = join(dir, `local-${timeUs}.img`);
    await restoreFromStore(source, output, { at, nowUs: Date.now() * 1000 });
    await restoreAt(logdir, local, { at, nowUs: Date.now() * 1000 });
    assertBytesEqual(readAll(output), readAll(local), `at ${formatTimeUtc(timeUs)}`);
    // The holes of the base stayed holes in the output.
    const blocks = Deno.statSync(output).blocks;
    assert.ok(blocks !== null && blocks * 512 < deviceBytes / 4, `sparse output: ${blocks}`);
  }
}

/** Writes `bytes` to `path` with its all-zero 4 KiB blocks left as holes. */
function writeSparse(path: string, bytes: Uint8Array): void {
  const fd = fs.openSync(path, "w");
  try {
    fs.ftruncateSync(fd, bytes.length);
    for (let offset = 0; offset < bytes.length; offset += 4096) {
      const block = bytes.subarray(offset, offset + 4096);
      if (block.some((byte) => byte !== 0)) fs.writeSync(fd, block, 0, block.length, offset);
    }
  } finally {
    fs.closeSync(fd);
  }
}

async function cliReportsDownloads(swift: SwiftNode, store: ObjectStore, dir: string) {
  const { w, manifest, seed } = await shippedWorkload(store, dir, "cli/vm1", 80);
  const timeUs = w.history[25].timeUs;
  const output = join(dir, "cli.img");
  const run = await runCli(
    ["restore", `s3://${BUCKET}/cli/vm1`, output, "--at", formatTimeUtc(timeUs), "--json"],
    { env: swift.env },
  );
  assert.deepEqual(run.code, 0, `[seed ${seed}] ${run.stderr}`);
  const result = JSON.parse(run.stdout);
  const needed = manifest.segments.filter((segment) => segment.firstUs <= timeUs);
  assert.deepEqual(
    [result.command, result.segmentsListed, result.segmentsFetched, result.objectsDownloaded],
    ["restore", manifest.segments.length, needed.length, 1 + needed.length],
  );
  assert.ok(result.bytesDownloaded >= manifest.deviceBytes, String(result.bytesDownloaded));
  assertBytesEqual(readAll(output), expectedAt(w, timeUs), `[seed ${seed}] cli restore`);
}

async function missingObject(swift: SwiftNode, store: ObjectStore, dir: string): Promise<void> {
  const { w, source, manifest } = await shippedWorkload(store, dir, "missing/vm1", 80);
  const lost = `missing/vm1/${segmentObjectName(manifest.segments[1])}`;
  await store.delete(lost);
  const output = join(dir, "out.img");
  const url = `s3://${BUCKET}/missing/vm1`;
  const run = await runCli(["restore", url, output], { env: swift.env });
  const lines = run.stderr.trim().split("\n");
  assert.deepEqual(run.code, 3, run.stderr);
  assert.deepEqual(lines.length, 1, run.stderr);
  assert.match(lines[0], new RegExp(`Object s3://${BUCKET}/${lost} named by .* is missing`));
  assert.deepEqual(fs.existsSync(output), false);
  // A point before the lost segment does not need it.
  const before = manifest.segments[1].firstUs - 1;
  if (before >= w.history[0].timeUs) {
    const early = await restoreFromStore(source, join(dir, "early.img"), {
      at: { kind: "instant", timeUs: before },
      nowUs: Date.now() * 1000,
    });
    assertBytesEqual(readAll(join(dir, "early.img")), expectedAt(w, before), "before the loss");
    assert.deepEqual(early.segmentsFetched, 1);
  }
  // The base: named too, through the library.
  const base = `missing/vm1/${baseObjectName(manifest.base.file)}`;
  await store.delete(base);
  await assert.rejects(
    // At a point the lost segment is not needed for, so that only the base is missing.
    () =>
      restoreFromStore(source, join(dir, "no-base.img"), {
        at: { kind: "seq", seq: manifest.segments[0].lastSeq },
      }),
    (error: Error) => {
      assert.ok(error instanceof IntegrityError, error.message);
      assert.match(error.message, new RegExp(`Object s3://${BUCKET}/${base} .* is missing`));
      assert.deepEqual(error.path, `s3://${BUCKET}/${base}`);
      return true;
    },
  );
  assert.deepEqual(fs.readdirSync(dir).filter((name) => name.startsWith("no-base")), []);
}

async function corruptedBase(store: ObjectStore, dir: string): Promise<void> {
  const { source, manifest } = await shippedWorkload(store, dir, "corrupt/vm1", 40);
  const key = `corrupt/vm1/${baseObjectName(manifest.base.file)}`;
  const good = (await store.get(key))!;
  // One byte in the data and, separately, one in the all-zero tail (a hole in the base file).
  for (const offset of [100, good.length - 1]) {
    const bad = good.slice();
    bad[offset] ^= 0x40;
    await store.put(key, bad);
    const output = join(dir, `corrupt-${offset}.img`);
    await assert.rejects(
      () => restoreFromStore(source, output, { partBytes: SMALL_PART_BYTES }),
      (error: Error) => {
        assert.ok(error instanceof IntegrityError, error.message);
        assert.match(error.message, /does not match its checksum/);
        assert.match(error.message, new RegExp(`s3://${BUCKET}/${key}`));
        return true;
      },
    );
    assert.deepEqual(
      fs.readdirSync(dir).filter((name) => name.startsWith(`corrupt-${offset}`)),
      [],
      "no output and no partial file",
    );
  }
  await store.put(key, good);
}

/**
 * An ObjectStore over the real one that, before the first GET of a segment, lets `swap` run: a
 * compaction's new manifest appears and the objects it no longer names are deleted, as a store
 * compaction does once its grace period is over.
 */
class SwapBeforeFirstSegmentGet implements ObjectStore {
  swaps = 0;
  #inner: ObjectStore;
  #swap: () => Promise<void>;
  constructor(inner: ObjectStore, swap: () => Promise<void>) {
    this.#inner = inner;
    this.#swap = swap;
  }
  async get(key: string, range?: ByteRange): Promise<Uint8Array | undefined> {
    if (this.swaps === 0 && key.includes("/segments/")) {
      this.swaps++;
      await this.#swap();
    }
    return await this.#inner.get(key, range);
  }
  check(): Promise<void> {
    return this.#inner.check();
  }
  describe(key: string): string {
    return this.#inner.describe(key);
  }
  put(key: string, bytes: Uint8Array): Promise<void> {
    return this.#inner.put(key, bytes);
  }
  putConditional(
    key: string,
    bytes: Uint8Array,
    condition: PutCondition,
  ): Promise<ConditionalPutResult> {
    return this.#inner.putConditional(key, bytes, condition);
  }
  getWithEtag(key: string): Promise<{ bytes: Uint8Array; etag: string } | undefined> {
    return this.#inner.getWithEtag(key);
  }
  putFile(key: string, path: string, options?: PutFileOptions): Promise<number> {
    return this.#inner.putFile(key, path, options);
  }

  head(key: string): Promise<ObjectInfo | undefined> {
    return this.#inner.head(key);
  }
  list(prefix: string): AsyncGenerator<ObjectInfo> {
    return this.#inner.list(prefix);
  }
  delete(key: string): Promise<void> {
    return this.#inner.delete(key);
  }
  close(): void {}
}

async function swappedManifestRetries(store: ObjectStore, dir: string): Promise<void> {
  const prefix = "swap/vm1";
  const { w, manifest, seed } = await shippedWorkload(store, dir, prefix, 150);
  const nowUs = Date.now() * 1000;
  const swapping = new SwapBeforeFirstSegmentGet(store, async () => {
    // A compaction of the store with no grace period: the folded objects are gone at once.
    await compactStore({ store, prefix }, { cutUs: w.history[100].timeUs, nowUs, graceMs: 0 });
  });
  const timeUs = w.history.at(-1)!.timeUs;
  const output = join(dir, "swapped.img");
  const result = await restoreFromStore({ store: swapping, prefix }, output, {
    at: { kind: "instant", timeUs },
    nowUs,
  });
  assert.deepEqual(swapping.swaps, 1);
  assert.deepEqual(result.attempts, 2, `[seed ${seed}] the first attempt found objects gone`);
  const compacted = (await readStoreManifest({ store, prefix }))!;
  assert.ok(compacted.levels.length === 1 && compacted.segments.length < manifest.segments.length);
  assert.deepEqual(result.segmentsListed, compacted.segments.length);
  assert.deepEqual(result.objectsDownloaded, 2 + compacted.segments.length);
  assertBytesEqual(readAll(output), expectedAt(w, timeUs), `[seed ${seed}] after the swap`);
}
