import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { IntegrityError } from "../lib/errors.ts";
import { ENTRY_HEADER_BYTES } from "../lib/format/entry.ts";
import { MANIFEST_FILE, readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { type ScannedEntry, SegmentScanner } from "../lib/format/segment.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { verifyLogdir } from "../lib/verify.ts";
import { FakeClock, makeImage, withTempDir } from "./_helpers.ts";

const DEVICE_BYTES = 128 * 1024;

interface Fixture {
  dir: string;
  devicePath: string;
  logdir: string;
  clock: FakeClock;
}

/**
 * A logdir whose entries all sit in sealed segments (several of them), with writes, zeroes and a
 * flush, and a base snapshot that holds data and holes.
 */
async function makeSealedLogdir(dir: string): Promise<Fixture> {
  const devicePath = join(dir, "disk.img");
  const logdir = join(dir, "log");
  const clock = new FakeClock();
  await makeImage(devicePath, DEVICE_BYTES, (bytes) => bytes.fill(0x33, 4096, 12288));
  await takeSnapshot(devicePath, logdir, { clock: clock.fn });
  const disk = await LogAssistedDisk.open(devicePath, logdir, {
    clock: clock.fn,
    segmentBytesMax: 8 * 1024,
  });
  try {
    for (let i = 0; i < 12; i++) {
      clock.advance(1000);
      await disk.write(i * 4096, new Uint8Array(3000).fill(i + 1));
      if (i % 4 === 3) await disk.zero(i * 4096 + 100, 200);
    }
    await disk.flush();
  } finally {
    await disk.close({ seal: true });
  }
  return { dir, devicePath, logdir, clock };
}

/** The n-th write entry of the log (0-based) and the sealed segment that holds it. */
async function findWrite(
  logdir: string,
  n: number,
): Promise<{ path: string; entry: ScannedEntry }> {
  const manifest = await readManifest(logdir);
  let seen = 0;
  for (const segment of manifest.segments) {
    const path = join(logdir, SEGMENTS_DIR, segment.file);
    const scanner = new SegmentScanner(path, { tolerateTornTail: false, headersOnly: true });
    for await (const entry of scanner.entries()) {
      if (entry.header.kind === "write" && seen++ === n) return { path, entry };
    }
  }
  throw new Error(`the log has fewer than ${n + 1} writes`);
}

function flipByte(path: string, offsetBytes: number): void {
  const fd = fs.openSync(path, "r+");
  try {
    const byte = new Uint8Array(1);
    fs.readSync(fd, byte, 0, 1, offsetBytes);
    byte[0] ^= 0x20;
    fs.writeSync(fd, byte, 0, 1, offsetBytes);
  } finally {
    fs.closeSync(fd);
  }
}

/** Asserts that `restoreAt` refuses with IntegrityError on `path` and leaves no output behind. */
async function assertRestoreRefuses(fixture: Fixture, path: string, offsetBytes?: number) {
  const output = join(fixture.dir, "restored.img");
  await assert.rejects(
    restoreAt(fixture.logdir, output, { nowUs: fixture.clock.nowUs }),
    (error: unknown) => {
      assert.ok(error instanceof IntegrityError, `IntegrityError, got ${error}`);
      assert.equal(error.path, path);
      if (offsetBytes !== undefined) assert.equal(error.offsetBytes, offsetBytes);
      assert.ok(error.message.includes(path), error.message);
      return true;
    },
  );
  const leftovers = fs.readdirSync(fixture.dir).filter((name) => name.startsWith("restored"));
  assert.deepEqual(leftovers, [], "a refused restore leaves no file behind");
}

Deno.test("verifyLogdir() reports a flipped payload byte in a sealed segment with file and offset", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    assert.ok((await verifyLogdir(fixture.logdir)).ok, "the fixture verifies before the flip");
    const { path, entry } = await findWrite(fixture.logdir, 5);
    flipByte(path, entry.fileOffsetBytes + ENTRY_HEADER_BYTES + 1234);
    const result = await verifyLogdir(fixture.logdir);
    assert.equal(result.ok, false);
    assert.equal(result.problems.length, 1);
    const [problem] = result.problems;
    assert.equal(problem.path, path);
    assert.equal(problem.offsetBytes, entry.fileOffsetBytes);
    assert.ok(
      problem.message.includes(`${path} at offset ${entry.fileOffsetBytes}: bad payload checksum`),
      problem.message,
    );
  });
});

Deno.test("restoreAt() refuses a logdir with a flipped payload byte in a sealed segment", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const { path, entry } = await findWrite(fixture.logdir, 5);
    flipByte(path, entry.fileOffsetBytes + ENTRY_HEADER_BYTES + 7);
    await assertRestoreRefuses(fixture, path, entry.fileOffsetBytes);
  });
});

Deno.test("verifyLogdir() and restoreAt() report a flipped header byte in a sealed segment", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const { path, entry } = await findWrite(fixture.logdir, 2);
    flipByte(path, entry.fileOffsetBytes + 26); // inside the offset field
    const result = await verifyLogdir(fixture.logdir);
    assert.equal(result.ok, false);
    assert.equal(result.problems[0].path, path);
    assert.equal(result.problems[0].offsetBytes, entry.fileOffsetBytes);
    assert.match(result.problems[0].message, /bad header checksum/);
    await assertRestoreRefuses(fixture, path, entry.fileOffsetBytes);
  });
});

Deno.test("verifyLogdir() and restoreAt() report a sealed segment shorter than the manifest says", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const { path } = await findWrite(fixture.logdir, 0);
    const sizeBytes = fs.statSync(path).size;
    fs.truncateSync(path, sizeBytes - 100);
    const result = await verifyLogdir(fixture.logdir);
    assert.equal(result.ok, false);
    assert.equal(result.problems[0].path, path);
    assert.match(result.problems[0].message, /was truncated/);
    await assertRestoreRefuses(fixture, path, sizeBytes - 100);
  });
});

Deno.test("verifyLogdir() and restoreAt() report a sealed segment that is missing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const { path } = await findWrite(fixture.logdir, 6);
    fs.unlinkSync(path);
    const result = await verifyLogdir(fixture.logdir);
    assert.equal(result.ok, false);
    assert.equal(result.problems[0].path, path);
    assert.match(result.problems[0].message, /missing/);
    await assertRestoreRefuses(fixture, path);
  });
});

Deno.test("verifyLogdir() and restoreAt() report a flipped byte in the base image", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const manifest = await readManifest(fixture.logdir);
    const basePath = join(fixture.logdir, manifest.base.file);
    for (const offsetBytes of [5000, 100_000]) { // in the data, then in a hole
      flipByte(basePath, offsetBytes);
      const result = await verifyLogdir(fixture.logdir);
      assert.equal(result.ok, false, `flip at ${offsetBytes}`);
      assert.equal(result.problems.length, 1);
      assert.equal(result.problems[0].path, basePath);
      assert.ok(
        result.problems[0].message.includes(
          `Base snapshot ${basePath} does not match its checksum`,
        ),
        result.problems[0].message,
      );
      assert.ok(result.problems[0].message.includes(`expected ${manifest.base.crc32c}`));
      assert.notEqual(result.baseCrc32c, manifest.base.crc32c);
      await assertRestoreRefuses(fixture, basePath);
      flipByte(basePath, offsetBytes);
    }
    assert.ok((await verifyLogdir(fixture.logdir)).ok, "flipped back, the base verifies again");
  });
});

Deno.test("verifyLogdir() reports a base image of the wrong size", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const manifest = await readManifest(fixture.logdir);
    const basePath = join(fixture.logdir, manifest.base.file);
    fs.truncateSync(basePath, DEVICE_BYTES - 512);
    const result = await verifyLogdir(fixture.logdir);
    assert.equal(result.ok, false);
    assert.equal(result.problems[0].path, basePath);
    assert.match(result.problems[0].message, /is 130560 bytes, the manifest says 131072/);
  });
});

Deno.test("readers refuse a manifest of garbage JSON with IntegrityError naming manifest.json", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const manifestPath = join(fixture.logdir, MANIFEST_FILE);
    const garbage = new Uint8Array([0x7b, 0x22, 0xff, 0x00, 0x13, 0x37, 0x0a]);
    fs.writeFileSync(manifestPath, garbage);
    const isManifestError = (error: unknown) => {
      assert.ok(error instanceof IntegrityError, `IntegrityError, got ${error}`);
      assert.equal(error.path, manifestPath);
      assert.ok(error.message.startsWith(`Cannot parse manifest ${manifestPath}: `), error.message);
      return true;
    };
    await assert.rejects(readManifest(fixture.logdir), isManifestError);
    await assert.rejects(verifyLogdir(fixture.logdir), isManifestError);
    await assert.rejects(restoreAt(fixture.logdir, join(dir, "out.img")), isManifestError);
    await assert.rejects(LogAssistedDisk.open(fixture.devicePath, fixture.logdir), isManifestError);
    assert.deepEqual(new Uint8Array(fs.readFileSync(manifestPath)), garbage, "left as it was");
    assert.ok(!fs.existsSync(join(dir, "out.img")));
  });
});

Deno.test("readers refuse a manifest that is JSON but not a valid manifest", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeSealedLogdir(dir);
    const manifestPath = join(fixture.logdir, MANIFEST_FILE);
    const good = await readManifest(fixture.logdir);
    const cases: [string, unknown, RegExp][] = [
      ["an array", [], /lists missing|format is not/],
      ["another format", { ...good, format: "qcow2" }, /format is not "sectorlog-logdir"/],
      ["no base", { ...good, base: null }, /base missing/],
      ["no segments list", { ...good, segments: "none" }, /lists missing/],
      [
        "a gap between segments",
        { ...good, segments: [good.segments[0], ...good.segments.slice(2)] },
        /starts at seq \d+, expected \d+/,
      ],
    ];
    for (const [what, value, detail] of cases) {
      fs.writeFileSync(manifestPath, JSON.stringify(value));
      await assert.rejects(verifyLogdir(fixture.logdir), (error: unknown) => {
        assert.ok(error instanceof IntegrityError, `${what}: IntegrityError, got ${error}`);
        assert.equal(error.path, manifestPath, what);
        assert.ok(error.message.startsWith(`Invalid manifest ${manifestPath}: `), error.message);
        assert.match(error.message, detail, what);
        return true;
      });
    }
  });
});
