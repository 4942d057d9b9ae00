import assert from "node:assert/strict";
import { crc32c } from "../lib/checksum.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { LogdirWriter } from "../lib/format/logdir_writer.ts";
import { LogTail } from "../lib/ship/log_tail.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { applyFromSeq } from "../lib/timeline.ts";
import { makeImage, withSeed, withTempDir } from "./_helpers.ts";
import { makeSource, writeEntries } from "./_ship_harness.ts";

async function openTail(logdir: string): Promise<LogTail> {
  const manifest = await readManifest(logdir);
  const tail = await LogTail.open(logdir, manifest, applyFromSeq(manifest));
  assert.ok(typeof tail !== "string", `cannot open a tail: ${tail}`);
  return tail;
}

Deno.test("LogTail.nextRun() hands out the entries next() does, in runs with their CRC32C", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const source = await makeSource(dir, "tail", random);
      await writeEntries(source, random, random.int(50, 200));

      const single = await openTail(source.logdir);
      const expected: Uint8Array[] = [];
      for (let entry = await single.next(); entry !== undefined; entry = await single.next()) {
        expected.push(entry.bytes.slice());
      }
      single.close();

      const runs = await openTail(source.logdir);
      const maxBytes = random.int(1, 20_000);
      const actual: Uint8Array[] = [];
      let nextSeq = runs.nextSeq;
      for (let run = await runs.nextRun(maxBytes); run; run = await runs.nextRun(maxBytes)) {
        assert.equal(run.firstSeq, nextSeq, "runs continue one another");
        assert.equal(run.lastSeq - run.firstSeq + 1, run.entries);
        assert.ok(run.entries === 1 || run.bytes.length <= maxBytes, "a run over maxBytes");
        assert.equal(run.crc32c, crc32c(run.bytes), `CRC32C of the run from seq ${run.firstSeq}`);
        nextSeq = run.lastSeq + 1;
        let position = 0;
        for (let i = 0; i < run.entries; i++) {
          const length = expected[actual.length].length;
          actual.push(run.bytes.slice(position, position + length));
          position += length;
        }
        assert.equal(position, run.bytes.length, "a run is whole entries");
      }
      runs.close();
      assert.equal(actual.length, expected.length, "every entry was handed out");
      assert.deepEqual(actual, expected);
    });
  });
});

Deno.test("LogTail hands out only entries the source holds durably (sealed or fsynced)", async () => {
  await withTempDir(async (dir) => {
    const device = `${dir}/disk.img`;
    const logdir = `${dir}/log`;
    await makeImage(device, 65536);
    await takeSnapshot(device, logdir, { hostId: "t" });
    const writer = await LogdirWriter.open(logdir, { purpose: "test", journalOnly: true });
    try {
      const tail = await openTail(logdir);
      writer.appendSync("write", 0, 512, new Uint8Array(512).fill(1));
      writer.appendSync("write", 512, 512, new Uint8Array(512).fill(2));
      // In the page cache only: a power cut at the source could take them back.
      assert.equal(await tail.next(), undefined);
      await writer.sync();
      assert.equal((await tail.next())?.header.seq, 1);
      assert.equal((await tail.next())?.header.seq, 2);
      writer.appendSync("mark", 0, 0, new TextEncoder().encode("unsynced"));
      assert.equal(await tail.next(), undefined);
      await writer.rotate(); // sealed: durable
      assert.equal((await tail.next())?.header.kind, "mark");
      tail.close();
    } finally {
      await writer.close();
    }
  });
});
