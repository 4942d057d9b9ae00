import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { AssertionError } from "../lib/_assert.ts";
import { IntegrityError } from "../lib/errors.ts";
import {
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  type EntryHeader,
  type EntryKind,
  makeEntryHeader,
} from "../lib/format/entry.ts";
import {
  parseSegmentFileName,
  SCAN_BUFFER_BYTES,
  SegmentAppender,
  segmentFileName,
  SegmentScanner,
  type SegmentScanOptions,
} from "../lib/format/segment.ts";
import { assertBytesEqual, type Random, withSeed, withTempDir } from "./_helpers.ts";

interface WrittenEntry {
  header: EntryHeader;
  payload: Uint8Array;
  fileOffsetBytes: number;
}

interface ScanResult {
  entries: WrittenEntry[];
  validBytes: number;
  tornBytes: number;
  tornProblem: string | undefined;
}

/** Scans `path`, copying payloads (the scanner reuses its buffer). */
async function scanSegment(path: string, options: SegmentScanOptions): Promise<ScanResult> {
  const scanner = new SegmentScanner(path, options);
  const entries: WrittenEntry[] = [];
  for await (const entry of scanner.entries()) {
    entries.push({ ...entry, payload: entry.payload.slice() });
  }
  return {
    entries,
    validBytes: scanner.validBytes,
    tornBytes: scanner.tornBytes,
    tornProblem: scanner.tornProblem,
  };
}

/** Random entries with consecutive seqs from 1 and non-decreasing times. */
function randomEntries(
  random: Random,
  count: number,
): { header: EntryHeader; payload: Uint8Array }[] {
  const kinds: EntryKind[] = ["write", "write", "write", "zero", "trim", "flush", "mark"];
  let timeUs = 1_764_000_000_000_000;
  const entries = [];
  for (let seq = 1; seq <= count; seq++) {
    timeUs += random.int(0, 2) * 1000;
    const kind = kinds[random.int(0, kinds.length - 1)];
    let offsetBytes = random.int(0, 1 << 30);
    let lengthBytes = random.int(1, 1 << 20);
    let payload = new Uint8Array(0);
    if (kind === "write") {
      lengthBytes = random.int(1, 8192);
      payload = new Uint8Array(lengthBytes);
      random.fill(payload);
    } else if (kind === "flush" || kind === "mark") {
      offsetBytes = 0;
      lengthBytes = 0;
      if (kind === "mark") payload = new TextEncoder().encode(`mark ${seq}`);
    }
    entries.push({
      header: makeEntryHeader({ kind, seq, timeUs, offsetBytes, lengthBytes }, payload),
      payload,
    });
  }
  return entries;
}

/** Appends `entries` to a new segment at `path` and returns where each one landed. */
function writeSegment(
  path: string,
  entries: { header: EntryHeader; payload: Uint8Array }[],
): WrittenEntry[] {
  const appender = SegmentAppender.open(path, entries[0]?.header.seq ?? 1, 0);
  const written: WrittenEntry[] = [];
  try {
    for (const { header, payload } of entries) {
      written.push({ header, payload, fileOffsetBytes: appender.sizeBytes });
      appender.append(header, header.payloadBytes === 0 ? undefined : payload);
    }
  } finally {
    appender.close();
  }
  assert.equal(fs.statSync(path).size, written.length === 0 ? 0 : entryEnd(written.at(-1)!));
  return written;
}

function entryEnd(entry: WrittenEntry): number {
  return entry.fileOffsetBytes + ENTRY_HEADER_BYTES + entry.header.payloadBytes;
}

/** Four small entries: write, zero, flush, write. */
function smallEntries(): { header: EntryHeader; payload: Uint8Array }[] {
  const timeUs = 1_764_000_000_000_000;
  const data = (n: number, fill: number) => new Uint8Array(n).fill(fill);
  const write = (seq: number, payload: Uint8Array) => ({
    header: makeEntryHeader(
      { kind: "write", seq, timeUs: timeUs + seq, offsetBytes: seq * 512, lengthBytes: 512 },
      payload,
    ),
    payload,
  });
  const none = new Uint8Array(0);
  return [
    write(1, data(512, 1)),
    {
      header: makeEntryHeader({
        kind: "zero",
        seq: 2,
        timeUs: timeUs + 2,
        offsetBytes: 0,
        lengthBytes: 4096,
      }),
      payload: none,
    },
    {
      header: makeEntryHeader({
        kind: "flush",
        seq: 3,
        timeUs: timeUs + 3,
        offsetBytes: 0,
        lengthBytes: 0,
      }),
      payload: none,
    },
    write(4, data(512, 4)),
  ];
}

/** The encoded bytes of one more entry (seq 5), as a torn append would start writing them. */
function nextEntryBytes(): Uint8Array {
  const payload = new Uint8Array(1000).fill(0x5a);
  const header = makeEntryHeader(
    { kind: "write", seq: 5, timeUs: 1_764_000_000_000_005, offsetBytes: 0, lengthBytes: 1000 },
    payload,
  );
  const bytes = new Uint8Array(ENTRY_HEADER_BYTES + payload.length);
  encodeEntryHeader(header, bytes);
  bytes.set(payload, ENTRY_HEADER_BYTES);
  return bytes;
}

function appendBytes(path: string, bytes: Uint8Array): void {
  fs.appendFileSync(path, bytes);
}

function assertSameEntries(actual: WrittenEntry[], expected: WrittenEntry[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: entry count`);
  for (let i = 0; i < expected.length; i++) {
    assert.deepEqual(actual[i].header, expected[i].header, `${what}: header ${i}`);
    assert.equal(actual[i].fileOffsetBytes, expected[i].fileOffsetBytes, `${what}: offset ${i}`);
    assertBytesEqual(actual[i].payload, expected[i].payload, `${what}: payload ${i}`);
  }
}

/** The torn tails a crash mid-append can leave after four whole entries. */
const TORN_TAILS: { name: string; tail: () => Uint8Array; problem: string }[] = [
  {
    name: "a header cut short",
    tail: () => nextEntryBytes().subarray(0, 30),
    problem: "incomplete entry header",
  },
  {
    name: "a payload cut short",
    tail: () => nextEntryBytes().subarray(0, ENTRY_HEADER_BYTES + 400),
    problem: "entry extends past end of file",
  },
  {
    name: "a whole header whose payload is still zeroes",
    tail: () => {
      const bytes = nextEntryBytes();
      bytes.fill(0, ENTRY_HEADER_BYTES);
      return bytes;
    },
    problem: "bad payload checksum",
  },
  { name: "a zero-filled tail", tail: () => new Uint8Array(8192), problem: "bad magic" },
  {
    name: "a short zero-filled tail",
    tail: () => new Uint8Array(40),
    problem: "incomplete entry header",
  },
  {
    name: "a garbage tail",
    tail: () => {
      const bytes = new Uint8Array(5000);
      for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 131 + 7) & 0xff;
      return bytes;
    },
    problem: "bad magic",
  },
];

Deno.test("SegmentScanner reads back every entry SegmentAppender wrote (property)", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      for (let round = 0; round < 5; round++) {
        const path = join(dir, segmentFileName(1 + round));
        const written = writeSegment(path, randomEntries(random, random.int(1, 200)));
        const scanned = await scanSegment(path, { tolerateTornTail: false });
        assertSameEntries(scanned.entries, written, `round ${round}`);
        assert.equal(scanned.validBytes, fs.statSync(path).size);
        assert.equal(scanned.tornBytes, 0);
        assert.equal(scanned.tornProblem, undefined);
      }
    });
  });
});

Deno.test("SegmentScanner reads entries larger than its coalescing and scan buffers", async () => {
  await withSeed(async (random) => {
    await withTempDir(async (dir) => {
      const path = join(dir, segmentFileName(1));
      const sizes = [300 * 1024, SCAN_BUFFER_BYTES + 4096, 17];
      const entries = sizes.map((lengthBytes, i) => {
        const payload = new Uint8Array(lengthBytes);
        random.fill(payload);
        const header = makeEntryHeader(
          { kind: "write", seq: i + 1, timeUs: 0, offsetBytes: 0, lengthBytes },
          payload,
        );
        return { header, payload };
      });
      const written = writeSegment(path, entries);
      const scanned = await scanSegment(path, { tolerateTornTail: false });
      assertSameEntries(scanned.entries, written, "large entries");
    });
  });
});

Deno.test("SegmentScanner with headersOnly yields headers and empty payloads", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const scanned = await scanSegment(path, { tolerateTornTail: false, headersOnly: true });
    assert.deepEqual(scanned.entries.map((e) => e.header), written.map((e) => e.header));
    assert.ok(scanned.entries.every((e) => e.payload.length === 0));
  });
});

Deno.test("SegmentScanner stops at endBytes and ignores bytes appended after it", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const endBytes = entryEnd(written[1]);
    const scanned = await scanSegment(path, { tolerateTornTail: false, endBytes });
    assertSameEntries(scanned.entries, written.slice(0, 2), "up to endBytes");
    assert.equal(scanned.validBytes, endBytes);
  });
});

Deno.test("SegmentScanner throws IntegrityError for a segment shorter than endBytes", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const sizeBytes = entryEnd(written.at(-1)!);
    fs.truncateSync(path, sizeBytes - 10);
    await assert.rejects(
      scanSegment(path, { tolerateTornTail: false, endBytes: sizeBytes }),
      (error: unknown) => {
        assert.ok(error instanceof IntegrityError);
        assert.equal(error.path, path);
        assert.equal(error.offsetBytes, sizeBytes - 10);
        assert.match(error.message, /was truncated/);
        return true;
      },
    );
  });
});

for (const { name, tail, problem } of TORN_TAILS) {
  Deno.test(`SegmentScanner tolerates ${name} in a live segment`, async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, segmentFileName(1));
      const written = writeSegment(path, smallEntries());
      const validBytes = entryEnd(written.at(-1)!);
      const tailBytes = tail();
      appendBytes(path, tailBytes);
      const scanned = await scanSegment(path, { tolerateTornTail: true });
      assertSameEntries(scanned.entries, written, name);
      assert.equal(scanned.validBytes, validBytes);
      assert.equal(scanned.tornBytes, tailBytes.length);
      assert.equal(scanned.tornProblem, problem);
    });
  });

  Deno.test(`SegmentScanner throws IntegrityError for ${name} in a sealed segment`, async () => {
    await withTempDir(async (dir) => {
      const path = join(dir, segmentFileName(1));
      const written = writeSegment(path, smallEntries());
      const validBytes = entryEnd(written.at(-1)!);
      appendBytes(path, tail());
      const yielded: number[] = [];
      const scanner = new SegmentScanner(path, { tolerateTornTail: false });
      await assert.rejects(
        async () => {
          for await (const entry of scanner.entries()) yielded.push(entry.header.seq);
        },
        (error: unknown) => {
          assert.ok(error instanceof IntegrityError, `IntegrityError, got ${error}`);
          assert.equal(error.path, path);
          assert.equal(error.offsetBytes, validBytes);
          assert.ok(
            error.message.includes(`${path} at offset ${validBytes}: ${problem}`),
            error.message,
          );
          return true;
        },
      );
      assert.deepEqual(yielded, [1, 2, 3, 4], "the entries before the bad one are yielded");
    });
  });
}

Deno.test("SegmentScanner ends an unsealed segment at a corrupt payload, whatever follows it", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const bad = written[0];
    const bytes = fs.readFileSync(path);
    bytes[bad.fileOffsetBytes + ENTRY_HEADER_BYTES + 100] ^= 0x01;
    fs.writeFileSync(path, bytes);
    // Past the last fsync, whole entries after a bad one are unsynced data: they decide nothing.
    const scanned = await scanSegment(path, { tolerateTornTail: true });
    assert.equal(scanned.entries.length, 0);
    assert.equal(scanned.validBytes, bad.fileOffsetBytes);
    assert.equal(scanned.tornProblem, "bad payload checksum");
    for (
      const options of [{ tolerateTornTail: false }, {
        tolerateTornTail: true,
        durableBytes: bad.fileOffsetBytes + 1,
      }]
    ) {
      await assert.rejects(scanSegment(path, options), (error: unknown) => {
        assert.ok(error instanceof IntegrityError);
        assert.equal(error.path, path);
        assert.equal(error.offsetBytes, bad.fileOffsetBytes);
        assert.match(error.message, /bad payload checksum/);
        if (options.tolerateTornTail) assert.match(error.message, /durably written/);
        return true;
      });
    }
  });
});

Deno.test("SegmentScanner reports a corrupt header inside the durably written bytes", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const bad = written[2]; // the flush
    const bytes = fs.readFileSync(path);
    bytes[bad.fileOffsetBytes + 9] ^= 0x40; // a seq bit
    fs.writeFileSync(path, bytes);
    const durableBytes = entryEnd(written.at(-1)!);
    await assert.rejects(
      scanSegment(path, { tolerateTornTail: true, durableBytes }),
      (error: unknown) => {
        assert.ok(error instanceof IntegrityError);
        assert.equal(error.offsetBytes, bad.fileOffsetBytes);
        assert.ok(
          error.message.includes(`${path} at offset ${bad.fileOffsetBytes}: bad header checksum`),
          error.message,
        );
        return true;
      },
    );
    const scanned = await scanSegment(path, { tolerateTornTail: true, durableBytes: 0 });
    assert.equal(scanned.validBytes, bad.fileOffsetBytes, "beyond the durable bytes: a torn tail");
  });
});

Deno.test("SegmentScanner checks payloads from payloadsFromBytes on in a header scan", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const written = writeSegment(path, smallEntries());
    const bad = written.at(-1)!;
    const bytes = fs.readFileSync(path);
    bytes[entryEnd(bad) - 1] ^= 0x01; // the last byte of the last payload: torn
    fs.writeFileSync(path, bytes);
    const unchecked = await scanSegment(path, { tolerateTornTail: true, headersOnly: true });
    assert.equal(unchecked.entries.length, written.length, "a header scan alone misses it");
    const checked = await scanSegment(path, {
      tolerateTornTail: true,
      headersOnly: true,
      payloadsFromBytes: bad.fileOffsetBytes,
    });
    assert.equal(checked.entries.length, written.length - 1);
    assert.equal(checked.validBytes, bad.fileOffsetBytes);
    assert.equal(checked.tornProblem, "bad payload checksum");
  });
});

Deno.test("SegmentAppender.open() truncates the file to validBytes and appends after it", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, segmentFileName(1));
    const entries = smallEntries();
    const written = writeSegment(path, entries);
    appendBytes(path, nextEntryBytes().subarray(0, 100));
    const validBytes = entryEnd(written.at(-1)!);
    const appender = SegmentAppender.open(path, 1, validBytes);
    try {
      assert.equal(fs.statSync(path).size, validBytes);
      assert.equal(appender.sizeBytes, validBytes);
      const payload = new Uint8Array(512).fill(5);
      const header = makeEntryHeader(
        { kind: "write", seq: 5, timeUs: 1_764_000_000_000_005, offsetBytes: 0, lengthBytes: 512 },
        payload,
      );
      appender.append(header, payload);
      await appender.sync();
      written.push({ header, payload, fileOffsetBytes: validBytes });
    } finally {
      appender.close();
    }
    const scanned = await scanSegment(path, { tolerateTornTail: false });
    assertSameEntries(scanned.entries, written, "after reopen");
  });
});

Deno.test("segmentFileName() pads the hex first seq to 16 digits", () => {
  assert.equal(segmentFileName(1), "0000000000000001.seg");
  assert.equal(segmentFileName(0x1234abcd), "000000001234abcd.seg");
  assert.equal(segmentFileName(Number.MAX_SAFE_INTEGER), "001fffffffffffff.seg");
  assert.throws(() => segmentFileName(0), AssertionError);
  assert.throws(() => segmentFileName(1.5), AssertionError);
});

Deno.test("parseSegmentFileName() reads back segmentFileName() and rejects other names", async () => {
  await withSeed((random) => {
    const seqs = [...Array(200)].map(() => random.int(1, Number.MAX_SAFE_INTEGER));
    for (const seq of seqs) assert.equal(parseSegmentFileName(segmentFileName(seq)), seq);
    // `ls` order is log order: sorting names as strings sorts them by seq.
    const names = seqs.map(segmentFileName).sort();
    assert.deepEqual(names.map(parseSegmentFileName), [...seqs].sort((a, b) => a - b));
    return Promise.resolve();
  });
  for (
    const name of [
      "1.seg",
      "000000000000000A.seg",
      "0000000000000001.seg.tmp",
      "0000000000000001.lvl",
      "00000000000000001.seg",
      "manifest.json",
    ]
  ) {
    assert.equal(parseSegmentFileName(name), undefined, name);
  }
});
