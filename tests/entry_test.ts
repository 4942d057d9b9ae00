import assert from "node:assert/strict";
import { AssertionError } from "../lib/_assert.ts";
import { crc32c } from "../lib/checksum.ts";
import {
  decodeEntryHeader,
  encodeEntryHeader,
  ENTRY_HEADER_BYTES,
  ENTRY_PAYLOAD_BYTES_MAX,
  type EntryHeader,
  type EntryKind,
  type HeaderProblem,
  makeEntryHeader,
  MARK_NAME_BYTES_MAX,
  payloadMatches,
} from "../lib/format/entry.ts";
import { type Random, withSeed } from "./_helpers.ts";

/** The payload of the golden entry; docs/FORMAT.md's worked example uses the same one. */
const GOLDEN_PAYLOAD = new TextEncoder().encode("sectorlog 16 B!\n");
const GOLDEN_HEADER: EntryHeader = makeEntryHeader({
  kind: "write",
  seq: 0x01_0203_0405,
  timeUs: 1_795_515_300_250_000, // 2026-11-24T10:15:00.250Z
  offsetBytes: 0x1000,
  lengthBytes: 16,
}, GOLDEN_PAYLOAD);

// Written out by hand so that any change to the byte layout fails here first.
// deno-fmt-ignore
const GOLDEN_BYTES = new Uint8Array([
  0x53, 0x4c, 0x47, 0x45, //  0 magic "SLGE"
  0x01, //                     4 format version 1
  0x01, //                     5 kind 1 = write
  0x00, 0x00, //               6 flags
  0x05, 0x04, 0x03, 0x02, 0x01, 0x00, 0x00, 0x00, //  8 seq 0x0102030405
  0x90, 0x01, 0xa9, 0xfb, 0x02, 0x61, 0x06, 0x00, // 16 time_us 1795515300250000
  0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 24 offset 4096
  0x10, 0x00, 0x00, 0x00, // 32 length 16
  0x10, 0x00, 0x00, 0x00, // 36 payload bytes 16
  0xb1, 0x31, 0x0a, 0x9a, // 40 payload CRC32C 0x9a0a31b1
  0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 44 reserved (16 bytes)
  0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
  0xe9, 0x8b, 0x22, 0x03, // 60 header CRC32C 0x03228be9
]);

/** A bit-at-a-time CRC32C, independent of lib/checksum.ts, to pin the polynomial. */
function referenceCrc32c(bytes: Uint8Array): number {
  let crc = 0xffff_ffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let bit = 0; bit < 8; bit++) crc = crc & 1 ? (crc >>> 1) ^ 0x82f6_3b78 : crc >>> 1;
  }
  return (crc ^ 0xffff_ffff) >>> 0;
}

function encode(header: EntryHeader): Uint8Array {
  const bytes = new Uint8Array(ENTRY_HEADER_BYTES);
  encodeEntryHeader(header, bytes);
  return bytes;
}

/** Rewrites the header checksum after a test edits the header, so other checks are reached. */
function reseal(bytes: Uint8Array): Uint8Array {
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(60, crc32c(bytes.subarray(0, 60)), true);
  return bytes;
}

function assertProblem(bytes: Uint8Array, problem: HeaderProblem, offset = 0): void {
  assert.deepEqual(decodeEntryHeader(bytes, offset), { ok: false, problem });
}

function randomHeader(random: Random): { header: EntryHeader; payload: Uint8Array } {
  const kinds: EntryKind[] = ["write", "zero", "trim", "flush", "mark"];
  const kind = kinds[random.int(0, kinds.length - 1)];
  const seq = random.int(1, Number.MAX_SAFE_INTEGER);
  const timeUs = random.int(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  let offsetBytes = random.int(0, Number.MAX_SAFE_INTEGER);
  let lengthBytes = 0;
  let payload = new Uint8Array(0);
  if (kind === "write") {
    lengthBytes = random.int(1, 4096);
    payload = new Uint8Array(lengthBytes);
    random.fill(payload);
  } else if (kind === "zero" || kind === "trim") {
    lengthBytes = random.int(1, 0xffff_ffff);
  } else {
    offsetBytes = 0;
    if (kind === "mark") {
      payload = new TextEncoder().encode(`mark-${random.int(0, 1e9)}`);
    }
  }
  return {
    header: makeEntryHeader({ kind, seq, timeUs, offsetBytes, lengthBytes }, payload),
    payload,
  };
}

Deno.test("crc32c() is CRC32C (Castagnoli) with the standard check value", () => {
  const check = new TextEncoder().encode("123456789");
  assert.equal(crc32c(check), 0xe306_9283);
  assert.equal(referenceCrc32c(check), 0xe306_9283);
  assert.equal(crc32c(GOLDEN_PAYLOAD), referenceCrc32c(GOLDEN_PAYLOAD));
});

Deno.test("encodeEntryHeader() writes the golden bytes for a fixed write header", () => {
  assert.deepEqual(encode(GOLDEN_HEADER), GOLDEN_BYTES);
  assert.equal(GOLDEN_HEADER.payloadCrc32c, referenceCrc32c(GOLDEN_PAYLOAD));
  const view = new DataView(GOLDEN_BYTES.buffer);
  assert.equal(view.getUint32(60, true), referenceCrc32c(GOLDEN_BYTES.subarray(0, 60)));
});

Deno.test("encodeEntryHeader() writes at an offset inside a larger buffer", () => {
  const target = new Uint8Array(10 + ENTRY_HEADER_BYTES + 10).fill(0xaa);
  encodeEntryHeader(GOLDEN_HEADER, target, 10);
  assert.deepEqual(target.subarray(10, 10 + ENTRY_HEADER_BYTES), GOLDEN_BYTES);
  assert.ok(target.subarray(0, 10).every((b) => b === 0xaa), "bytes before untouched");
  assert.ok(target.subarray(10 + ENTRY_HEADER_BYTES).every((b) => b === 0xaa), "after untouched");
});

Deno.test("decodeEntryHeader() reads the golden bytes back", () => {
  assert.deepEqual(decodeEntryHeader(GOLDEN_BYTES), { ok: true, header: GOLDEN_HEADER });
  const padded = new Uint8Array(7 + ENTRY_HEADER_BYTES);
  padded.set(GOLDEN_BYTES, 7);
  assert.deepEqual(decodeEntryHeader(padded, 7), { ok: true, header: GOLDEN_HEADER });
});

Deno.test("decodeEntryHeader() returns every encoded header unchanged (property)", async () => {
  await withSeed((random) => {
    for (let i = 0; i < 2000; i++) {
      const { header, payload } = randomHeader(random);
      const bytes = encode(header);
      const decoded = decodeEntryHeader(bytes);
      assert.deepEqual(decoded, { ok: true, header }, `header ${i}: ${JSON.stringify(header)}`);
      assert.ok(payloadMatches(header, payload), `payload ${i} matches its header`);
    }
    return Promise.resolve();
  });
});

Deno.test("decodeEntryHeader() rejects a header that is too short", () => {
  assertProblem(GOLDEN_BYTES.subarray(0, ENTRY_HEADER_BYTES - 1), "short");
  assertProblem(new Uint8Array(0), "short");
  assertProblem(GOLDEN_BYTES, "short", 1);
});

Deno.test("decodeEntryHeader() rejects bad magic", () => {
  const bytes = reseal(GOLDEN_BYTES.slice());
  bytes[3] = 0x46; // "SLGF"
  assertProblem(reseal(bytes), "bad magic");
  assertProblem(new Uint8Array(ENTRY_HEADER_BYTES), "bad magic"); // a zero-filled tail
});

Deno.test("decodeEntryHeader() rejects a flipped bit in the header", async () => {
  await withSeed((random) => {
    // Every bit after the magic, including the checksum itself, is covered by the header CRC.
    for (let bit = 32; bit < ENTRY_HEADER_BYTES * 8; bit++) {
      const bytes = GOLDEN_BYTES.slice();
      bytes[bit >> 3] ^= 1 << (bit & 7);
      assertProblem(bytes, "bad header checksum");
    }
    for (let i = 0; i < 200; i++) {
      const bytes = encode(randomHeader(random).header);
      const bit = random.int(32, ENTRY_HEADER_BYTES * 8 - 1);
      bytes[bit >> 3] ^= 1 << (bit & 7);
      assertProblem(bytes, "bad header checksum");
    }
    return Promise.resolve();
  });
});

Deno.test("decodeEntryHeader() rejects an unsupported format version", () => {
  const bytes = GOLDEN_BYTES.slice();
  bytes[4] = 2;
  assertProblem(reseal(bytes), "unsupported version");
});

Deno.test("decodeEntryHeader() rejects an unknown kind", () => {
  for (const code of [0, 6, 0xff]) {
    const bytes = GOLDEN_BYTES.slice();
    bytes[5] = code;
    assertProblem(reseal(bytes), "unknown kind");
  }
});

Deno.test("decodeEntryHeader() rejects unknown flags", () => {
  for (const [index, value] of [[6, 1], [7, 0x80]]) {
    const bytes = GOLDEN_BYTES.slice();
    bytes[index] = value;
    assertProblem(reseal(bytes), "unknown flags");
  }
});

Deno.test("decodeEntryHeader() rejects fields that break the kind's rules", () => {
  const cases: [string, (view: DataView) => void][] = [
    ["write with payload bytes != length", (v) => v.setUint32(36, 15, true)],
    ["write with length 0", (v) => {
      v.setUint32(32, 0, true);
      v.setUint32(36, 0, true);
    }],
    ["write over the payload limit", (v) => {
      v.setUint32(32, ENTRY_PAYLOAD_BYTES_MAX + 1, true);
      v.setUint32(36, ENTRY_PAYLOAD_BYTES_MAX + 1, true);
    }],
    ["seq 0", (v) => v.setBigUint64(8, 0n, true)],
    ["seq over 2^53", (v) => v.setBigUint64(8, 2n ** 53n, true)],
    ["offset over 2^53", (v) => v.setBigUint64(24, 2n ** 60n, true)],
    ["time over 2^53", (v) => v.setBigInt64(16, 2n ** 62n, true)],
    ["time under -2^53", (v) => v.setBigInt64(16, -(2n ** 62n), true)],
    ["zero with a payload", (v) => {
      v.setUint8(5, 2);
      v.setUint32(36, 16, true);
    }],
    ["trim with length 0", (v) => {
      v.setUint8(5, 3);
      v.setUint32(32, 0, true);
      v.setUint32(36, 0, true);
    }],
    ["flush with a range", (v) => {
      v.setUint8(5, 4);
      v.setUint32(36, 0, true);
    }],
    ["flush with an offset", (v) => {
      v.setUint8(5, 4);
      v.setUint32(32, 0, true);
      v.setUint32(36, 0, true);
    }],
    ["mark with a range", (v) => v.setUint8(5, 5)],
    ["mark with an empty name", (v) => {
      v.setUint8(5, 5);
      v.setBigUint64(24, 0n, true);
      v.setUint32(32, 0, true);
      v.setUint32(36, 0, true);
    }],
    ["mark with a name over 255 bytes", (v) => {
      v.setUint8(5, 5);
      v.setBigUint64(24, 0n, true);
      v.setUint32(32, 0, true);
      v.setUint32(36, MARK_NAME_BYTES_MAX + 1, true);
    }],
  ];
  for (const [what, edit] of cases) {
    const bytes = GOLDEN_BYTES.slice();
    edit(new DataView(bytes.buffer));
    assert.deepEqual(
      decodeEntryHeader(reseal(bytes)),
      { ok: false, problem: "bad field" },
      what,
    );
  }
});

Deno.test("encodeEntryHeader() refuses a header the decoder would reject", () => {
  const bad: EntryHeader[] = [
    { ...GOLDEN_HEADER, payloadBytes: 15 },
    { ...GOLDEN_HEADER, seq: 0 },
    { ...GOLDEN_HEADER, kind: "flush" },
    { ...GOLDEN_HEADER, timeUs: 2 ** 60 },
  ];
  for (const header of bad) {
    assert.throws(() => encode(header), AssertionError, JSON.stringify(header));
  }
  assert.throws(() => encodeEntryHeader(GOLDEN_HEADER, new Uint8Array(63)), AssertionError);
});

Deno.test("payloadMatches() checks the payload's length and CRC32C", () => {
  assert.ok(payloadMatches(GOLDEN_HEADER, GOLDEN_PAYLOAD));
  const flipped = GOLDEN_PAYLOAD.slice();
  flipped[5] ^= 0x10;
  assert.ok(!payloadMatches(GOLDEN_HEADER, flipped), "a flipped payload bit");
  assert.ok(!payloadMatches(GOLDEN_HEADER, GOLDEN_PAYLOAD.subarray(0, 15)), "a short payload");
  const longer = new Uint8Array(17);
  longer.set(GOLDEN_PAYLOAD);
  assert.ok(!payloadMatches(GOLDEN_HEADER, longer), "a long payload");
  const flush = makeEntryHeader({
    kind: "flush",
    seq: 9,
    timeUs: 0,
    offsetBytes: 0,
    lengthBytes: 0,
  });
  assert.equal(flush.payloadCrc32c, 0);
  assert.ok(payloadMatches(flush, new Uint8Array(0)), "an empty payload");
  assert.ok(!payloadMatches({ ...flush, payloadCrc32c: 1 }, new Uint8Array(0)), "empty, crc 1");
});
