/**
 * The simulated disk: the same behaviour as the real filesystem while the power stays on (one
 * suite, run against both), and at a power cut exactly the freedoms a real disk has: unsynced
 * writes kept, lost or torn at sector granularity, unsynced directory changes undone.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { realStorage } from "../lib/storage/real_storage.ts";
import {
  type CutMode,
  PowerCutError,
  SIM_SECTOR_BYTES,
  SimDisk,
} from "../lib/storage/sim_storage.ts";
import {
  readFileBytes,
  readFully,
  readTextFile,
  replaceFileDurably,
  type Storage,
  StorageNotFound,
} from "../lib/storage/storage.ts";
import { withTempDir } from "./_helpers.ts";

const wholeFile = (storage: Storage, path: string) =>
  readFileBytes(storage, path, Number.MAX_SAFE_INTEGER);

/** Runs `body` against the real filesystem (in a temp dir) and against a simulated disk. */
function bothStorages(name: string, body: (storage: Storage, dir: string) => Promise<void>) {
  Deno.test(`${name} (local filesystem)`, () => withTempDir((dir) => body(realStorage, dir)));
  Deno.test(`${name} (simulated disk)`, async () => {
    const storage = new SimDisk({ seed: 1 }).process();
    storage.mkdir("/t");
    await body(storage, "/t");
  });
}

bothStorages("Storage writes, reads, extends with zeroes and truncates", async (storage, dir) => {
  const path = join(dir, "a");
  const file = storage.open(path, { create: true });
  file.write(new Uint8Array([1, 2, 3]), 3, 0);
  file.write(new Uint8Array([9]), 1, 6);
  assert.equal(file.sizeBytes(), 7);
  const bytes = new Uint8Array(7);
  readFully(file, bytes, 7, 0);
  assert.deepEqual([...bytes], [1, 2, 3, 0, 0, 0, 9]);
  file.truncate(2);
  assert.equal(file.sizeBytes(), 2);
  assert.equal(file.read(bytes, 7, 0), 2, "a read past the end is short");
  await file.syncData();
  file.close();
  assert.equal(storage.stat(path)?.kind, "file");
  assert.equal(storage.stat(path)?.sizeBytes, 2);
});

bothStorages("Storage names: readDir, rename, link, unlink, removeTree", async (storage, dir) => {
  storage.mkdir(join(dir, "sub/deeper"), { recursive: true });
  const a = storage.open(join(dir, "sub/a"), { create: true });
  a.write(new Uint8Array([7]), 1, 0);
  a.close();
  storage.rename(join(dir, "sub/a"), join(dir, "sub/b"));
  storage.link(join(dir, "sub/b"), join(dir, "sub/c"));
  assert.deepEqual(storage.readDir(join(dir, "sub")).sort(), ["b", "c", "deeper"]);
  assert.deepEqual([...wholeFile(storage, join(dir, "sub/c"))], [7]);
  storage.unlink(join(dir, "sub/b"));
  assert.throws(() => storage.unlink(join(dir, "sub/b")), StorageNotFound);
  assert.throws(() => storage.open(join(dir, "sub/b")), StorageNotFound);
  assert.equal(storage.stat(join(dir, "sub/b")), undefined);
  await storage.syncDirectory(join(dir, "sub"));
  storage.removeTree(join(dir, "sub"));
  assert.equal(storage.stat(join(dir, "sub")), undefined);
  storage.removeTree(join(dir, "sub")); // nothing there: no error
});

bothStorages("Storage.replaceFileDurably() swaps the content whole", async (storage, dir) => {
  const path = join(dir, "manifest.json");
  await replaceFileDurably(storage, path, new TextEncoder().encode("one"));
  await replaceFileDurably(storage, path, new TextEncoder().encode("two"));
  assert.equal(readTextFile(storage, path, 100), "two");
  assert.deepEqual(storage.readDir(dir), ["manifest.json"], "no temp file left");
});

bothStorages(
  "Storage locks: one holder at a time, lock() waits for close",
  async (storage, dir) => {
    const path = join(dir, "lock");
    const first = storage.open(path, { create: true });
    const second = storage.open(path);
    assert.ok(first.tryLock());
    assert.ok(!second.tryLock(), "a second open file description does not get the lock");
    let taken = false;
    const waiting = second.lock().then(() => taken = true);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.ok(!taken);
    first.close();
    await waiting;
    assert.ok(taken);
    second.close();
  },
);

Deno.test("SimDisk: synced data survives every cut mode, unsynced data only some", async () => {
  for (const fileMode of ["lose-all", "keep-all", "random", "prefix"] as CutMode[]) {
    const disk = new SimDisk({ seed: 7 });
    const storage = disk.process();
    const file = storage.open("/f", { create: true });
    file.write(new Uint8Array(1024).fill(1), 1024, 0);
    await file.syncData();
    await storage.syncDirectory("/");
    file.write(new Uint8Array(1024).fill(2), 1024, 1024);
    disk.powerCut({ fileMode, dirMode: "lose-all" });
    assert.ok(!storage.alive);
    assert.throws(() => file.sizeBytes(), PowerCutError, "the old process is dead");
    const after = wholeFile(disk.process(), "/f");
    assert.deepEqual(after.subarray(0, 1024), new Uint8Array(1024).fill(1), fileMode);
    if (fileMode === "lose-all") assert.equal(after.length, 1024);
    if (fileMode === "keep-all") {
      assert.deepEqual(after.subarray(1024), new Uint8Array(1024).fill(2));
    }
  }
});

Deno.test("SimDisk tears unsynced writes at sector granularity, never within a sector", async () => {
  let torn = 0;
  for (let seed = 0; seed < 200; seed++) {
    const disk = new SimDisk({ seed });
    const storage = disk.process();
    const file = storage.open("/f", { create: true });
    file.write(new Uint8Array(4 * SIM_SECTOR_BYTES).fill(1), 4 * SIM_SECTOR_BYTES, 0);
    await file.syncData();
    await storage.syncDirectory("/");
    file.write(new Uint8Array(4 * SIM_SECTOR_BYTES).fill(2), 4 * SIM_SECTOR_BYTES, 0);
    disk.powerCut({ fileMode: "random", dirMode: "keep-all" });
    const after = wholeFile(disk.process(), "/f");
    const sectors = new Set<number>();
    for (let sector = 0; sector < 4; sector++) {
      const values = new Set(after.subarray(sector * 512, (sector + 1) * 512));
      assert.equal(values.size, 1, `seed ${seed}: sector ${sector} is all old or all new`);
      sectors.add([...values][0]);
    }
    if (sectors.size === 2) torn++;
  }
  assert.ok(torn > 10, `some writes torn (${torn} of 200)`);
});

Deno.test("SimDisk undoes directory changes no directory fsync covered", async () => {
  const disk = new SimDisk({ seed: 3 });
  let storage = disk.process();
  storage.mkdir("/d");
  await storage.syncDirectory("/");
  const file = storage.open("/d/new", { create: true });
  file.write(new Uint8Array([1]), 1, 0);
  await file.syncData(); // the data, not the name
  disk.powerCut({ fileMode: "keep-all", dirMode: "lose-all" });
  storage = disk.process();
  assert.deepEqual(storage.readDir("/d"), [], "the create was undone");
  const again = storage.open("/d/kept", { create: true });
  again.close();
  await storage.syncDirectory("/d");
  storage.rename("/d/kept", "/d/renamed");
  disk.powerCut({ fileMode: "keep-all", dirMode: "lose-all" });
  assert.deepEqual(disk.process().readDir("/d"), ["kept"], "the rename was undone whole");
});

Deno.test("SimDisk: a fsync covers what was written before it, not after", async () => {
  const disk = new SimDisk({ seed: 5 });
  const storage = disk.process();
  const file = storage.open("/f", { create: true });
  await storage.syncDirectory("/");
  file.write(new Uint8Array([1]), 1, 0);
  const sync = file.syncData();
  file.write(new Uint8Array([2]), 1, 1); // while the fsync runs
  await sync;
  disk.powerCut({ fileMode: "lose-all", dirMode: "lose-all" });
  assert.deepEqual([...wholeFile(disk.process(), "/f")], [1]);
});

Deno.test("SimDisk cuts at a chosen operation and replays the same run from its seed", async () => {
  const run = async (seed: number) => {
    const disk = new SimDisk({ seed });
    const storage = disk.process();
    const file = storage.open("/f", { create: true });
    await storage.syncDirectory("/");
    disk.cutAfterOps(25);
    let written = 0;
    try {
      for (let i = 0; i < 100; i++) {
        file.write(new Uint8Array([i]), 1, i);
        written++;
        if (i % 4 === 0) await file.syncData();
      }
    } catch (error) {
      assert.ok(error instanceof PowerCutError);
    }
    return { written, after: [...wholeFile(disk.process(), "/f")] };
  };
  const first = await run(11);
  assert.ok(first.written < 100, "the cut came");
  assert.deepEqual(await run(11), first, "same seed, same run");
});
