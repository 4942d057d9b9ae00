import assert from "node:assert/strict";
import { concatBytes } from "../lib/byte_sink.ts";
import {
  CHUNK_RAW_BYTES_MAX,
  compressChunk,
  CONTROL_BYTES_MAX,
  decodeChunkBody,
  decodeJsonBody,
  decompressChunk,
  encodeChunkBody,
  encodeFrame,
  encodeJsonFrame,
  FRAME_TYPES,
  FrameBuilder,
  frameEnvelope,
  FrameReader,
  frameTypeName,
  ProtocolError,
} from "../lib/ship/wire.ts";
import { constantTimeEqual, fromHex, toHex } from "../lib/ship/auth.ts";
import { crc32c } from "../lib/checksum.ts";
import { encodeEntryHeader, ENTRY_HEADER_BYTES, makeEntryHeader } from "../lib/format/entry.ts";
import { hostIdProblem } from "../lib/ship/_messages.ts";
import { Random, withSeed } from "./_helpers.ts";

/** A byte source over fixed bytes that hands them out in random-sized reads. */
class ChoppedSource {
  #bytes: Uint8Array;
  #offset = 0;
  #random: Random;
  reads = 0;
  constructor(bytes: Uint8Array, random = new Random(1)) {
    this.#bytes = bytes;
    this.#random = random;
  }
  get consumed(): number {
    return this.#offset;
  }
  read(target: Uint8Array): Promise<number | null> {
    this.reads++;
    if (this.#offset >= this.#bytes.length) return Promise.resolve(null);
    const count = Math.min(
      target.length,
      this.#bytes.length - this.#offset,
      this.#random.int(1, 100_000),
    );
    target.set(this.#bytes.subarray(this.#offset, this.#offset + count));
    this.#offset += count;
    return Promise.resolve(count);
  }
}

Deno.test("encodeJsonFrame() writes the documented golden bytes for ACK {lastSeq: 7}", () => {
  const frame = encodeJsonFrame(FRAME_TYPES.ACK, { lastSeq: 7 });
  assert.deepEqual(
    Array.from(frame),
    [
      ...[0x00, 0x00, 0x00, 0x0d], // body length 13, big-endian
      0x0d, // type ACK
      ...new TextEncoder().encode('{"lastSeq":7}'),
      ...[0x01, 0xd4, 0xf9, 0xdf], // CRC32C of type + body, big-endian
    ],
  );
});

Deno.test("FrameReader round-trips frames of every size class through chopped reads", async () => {
  await withSeed(async (random) => {
    const bodies = [0, 1, 13, 64 * 1024, 256 * 1024 + 3, 5 * 1024 * 1024].map((size) => {
      const body = new Uint8Array(size);
      random.fill(body.subarray(0, Math.min(size, 4096)));
      body[size - 1] = 0xab;
      return body;
    });
    const frames = bodies.map((body, i) =>
      encodeFrame(i % 2 === 0 ? FRAME_TYPES.ENTRIES : FRAME_TYPES.BASE_CHUNK, body)
    );
    const reader = new FrameReader(new ChoppedSource(concatBytes(frames), random));
    for (let i = 0; i < bodies.length; i++) {
      const frame = await reader.read();
      assert.ok(frame !== undefined, `frame ${i} missing`);
      assert.equal(frame.type, i % 2 === 0 ? FRAME_TYPES.ENTRIES : FRAME_TYPES.BASE_CHUNK);
      assert.deepEqual(frame.body, bodies[i], `frame ${i} body`);
    }
    assert.equal(await reader.read(), undefined, "a clean end between frames is undefined");
  });
});

Deno.test("FrameBuilder builds the same bytes as encodeFrame()", () => {
  const builder = new FrameBuilder(16);
  builder.begin(FRAME_TYPES.ENTRIES);
  builder.append(new Uint8Array([1, 2, 3]));
  builder.reserve(40).fill(9);
  const built = builder.finish().slice();
  const body = new Uint8Array(43);
  body.set([1, 2, 3]);
  body.fill(9, 3);
  assert.deepEqual(built, encodeFrame(FRAME_TYPES.ENTRIES, body));
});

/** Entries as on disk (header + payload), of random kinds of payload size including none. */
function entryBytesList(
  random: Random,
  count: number,
): { bytes: Uint8Array; payload: Uint8Array }[] {
  const entries = [];
  for (let seq = 1; seq <= count; seq++) {
    const payload = new Uint8Array(random.int(0, 3) === 0 ? 0 : random.int(1, 70_000));
    random.fill(payload.subarray(0, Math.min(payload.length, 512)));
    if (payload.length > 0) payload[payload.length - 1] = seq & 0xff;
    const header = payload.length === 0
      ? makeEntryHeader({ kind: "flush", seq, timeUs: seq, offsetBytes: 0, lengthBytes: 0 })
      : makeEntryHeader(
        { kind: "write", seq, timeUs: seq, offsetBytes: 0, lengthBytes: payload.length },
        payload,
      );
    const bytes = new Uint8Array(ENTRY_HEADER_BYTES + payload.length);
    encodeEntryHeader(header, bytes);
    bytes.set(payload, ENTRY_HEADER_BYTES);
    entries.push({ bytes, payload });
  }
  return entries;
}

Deno.test("frameEnvelope() around a body makes the bytes encodeFrame() makes", async () => {
  await withSeed((random) => {
    const entries = entryBytesList(random, random.int(0, 40));
    const body = concatBytes(entries.map((entry) => entry.bytes));
    const { head, tail } = frameEnvelope(FRAME_TYPES.ENTRIES, body.length, crc32c(body));
    assert.deepEqual(concatBytes([head, body, tail]), encodeFrame(FRAME_TYPES.ENTRIES, body));
    return Promise.resolve();
  });
});

Deno.test("FrameReader checks an ENTRIES frame once and hands out each payload's CRC", async () => {
  await withSeed(async (random) => {
    const entries = entryBytesList(random, random.int(1, 40));
    const frame = encodeFrame(
      FRAME_TYPES.ENTRIES,
      concatBytes(entries.map((entry) => entry.bytes)),
    );
    const read = await new FrameReader(new ChoppedSource(frame, random)).read();
    assert.ok(read !== undefined);
    assert.deepEqual(read.payloadCrc32c, entries.map((entry) => crc32c(entry.payload)));

    // A flipped bit anywhere, in a header or a payload, is a bad frame checksum.
    for (let trial = 0; trial < 20; trial++) {
      const damaged = frame.slice();
      damaged[random.int(5, damaged.length - 5)] ^= 1 << random.int(0, 7);
      await assert.rejects(
        () => new FrameReader(new ChoppedSource(damaged, random)).read(),
        /Bad checksum on a ENTRIES frame/,
      );
    }
  });
});

Deno.test("FrameReader refuses an oversized length before reading the body", async () => {
  const header = new Uint8Array([0x7f, 0xff, 0xff, 0xff, FRAME_TYPES.ENTRIES]);
  const source = new ChoppedSource(concatBytes([header, new Uint8Array(1000)]));
  const reader = new FrameReader(source);
  await assert.rejects(() => reader.read(), (error: Error) => {
    assert.ok(error instanceof ProtocolError);
    assert.match(error.message, /ENTRIES frame announces 2147483647 bytes, over the limit/);
    return true;
  });
  assert.ok(source.consumed <= 1005, "the body was not read");

  const small = new FrameReader(
    new ChoppedSource(encodeFrame(FRAME_TYPES.CLIENT_HELLO, new Uint8Array(CONTROL_BYTES_MAX + 1))),
    { frameBytesMax: CONTROL_BYTES_MAX },
  );
  await assert.rejects(() => small.read(), /CLIENT_HELLO frame announces 65537 bytes/);
});

Deno.test("FrameReader reports a truncated header, body and checksum", async () => {
  const frame = encodeJsonFrame(FRAME_TYPES.PING, {});
  for (const cut of [3, 6, frame.length - 1]) {
    const reader = new FrameReader(new ChoppedSource(frame.subarray(0, cut)));
    await assert.rejects(() => reader.read(), (error: Error) => {
      assert.ok(error instanceof ProtocolError, `cut at ${cut}: ${error}`);
      assert.match(error.message, /^Truncated frame/);
      return true;
    });
  }
});

Deno.test("FrameReader refuses a frame whose checksum does not match", async () => {
  const frame = encodeJsonFrame(FRAME_TYPES.ACK, { lastSeq: 7 });
  frame[8] ^= 0x20;
  const reader = new FrameReader(new ChoppedSource(frame));
  await assert.rejects(() => reader.read(), /Bad checksum on a ACK frame of 13 bytes/);
  const typeFlipped = encodeJsonFrame(FRAME_TYPES.ACK, { lastSeq: 7 });
  typeFlipped[4] = FRAME_TYPES.BYE;
  await assert.rejects(
    () => new FrameReader(new ChoppedSource(typeFlipped)).read(),
    /Bad checksum on a BYE frame/,
  );
});

Deno.test("FrameReader turns random garbage into a ProtocolError, never a frame", async () => {
  await withSeed(async (random) => {
    for (let round = 0; round < 200; round++) {
      const garbage = new Uint8Array(random.int(1, 5000));
      random.fill(garbage);
      const reader = new FrameReader(new ChoppedSource(garbage, random), {
        frameBytesMax: CONTROL_BYTES_MAX,
      });
      await assert.rejects(() => reader.read(), ProtocolError, `round ${round}`);
    }
  });
});

Deno.test("decodeJsonBody() refuses bodies that are not a JSON object", () => {
  const frame = (text: string) => ({
    type: FRAME_TYPES.WELCOME,
    body: new TextEncoder().encode(text),
  });
  assert.deepEqual(decodeJsonBody(frame('{"a":1}')), { a: 1 });
  assert.throws(() => decodeJsonBody(frame("{")), /Bad WELCOME frame: body is not JSON/);
  assert.throws(() => decodeJsonBody(frame("[1]")), /not a JSON object/);
  assert.throws(
    () => decodeJsonBody({ type: 3, body: new Uint8Array([0xff, 0xfe]) }),
    ProtocolError,
  );
});

Deno.test("chunk bodies round-trip and refuse a size other than announced", () => {
  const raw = new Uint8Array(CHUNK_RAW_BYTES_MAX).fill(7);
  const body = encodeChunkBody({
    offsetBytes: 2 ** 40,
    rawBytes: raw.length,
    compressed: compressChunk(raw),
  });
  assert.ok(body.length < 1000, "a run of sevens compresses");
  const chunk = decodeChunkBody({ type: FRAME_TYPES.BASE_CHUNK, body });
  assert.equal(chunk.offsetBytes, 2 ** 40);
  assert.deepEqual(decompressChunk(chunk, "base chunk"), raw);
  assert.throws(
    () => decompressChunk({ ...chunk, rawBytes: 1000 }, "base chunk"),
    /Bad base chunk at offset 1099511627776/,
  );
  assert.throws(
    () => decompressChunk({ ...chunk, compressed: new Uint8Array([1, 2, 3]) }, "level chunk"),
    ProtocolError,
  );
  const tooBig = encodeChunkBody({ offsetBytes: 0, rawBytes: 1, compressed: new Uint8Array() });
  new DataView(tooBig.buffer).setUint32(8, CHUNK_RAW_BYTES_MAX + 1);
  assert.throws(() => decodeChunkBody({ type: FRAME_TYPES.LEVEL_CHUNK, body: tooBig }), /range/);
});

Deno.test("frameTypeName() names known and unknown types", () => {
  assert.equal(frameTypeName(FRAME_TYPES.STATE_BEGIN), "STATE_BEGIN");
  assert.equal(frameTypeName(0x2a), "unknown(0x2a)");
});

Deno.test("hostIdProblem() refuses path tricks and accepts ordinary ids", () => {
  for (const ok of ["vm1", "db-01.example.com", "A_b"]) assert.equal(hostIdProblem(ok), undefined);
  for (const bad of ["../evil", "..", ".hidden", "a/b", "", "a..b", "x".repeat(65), "é"]) {
    assert.ok(hostIdProblem(bad) !== undefined, bad);
  }
});

Deno.test("auth helpers: hex round trip and constant-time compare", () => {
  const bytes = new Uint8Array([0, 1, 0xfe, 0xff]);
  assert.equal(toHex(bytes), "0001feff");
  assert.deepEqual(fromHex("0001FEFF", 4), bytes);
  assert.equal(fromHex("0001fe", 4), undefined);
  assert.equal(fromHex("zz01feff", 4), undefined);
  assert.ok(constantTimeEqual(bytes, bytes.slice()));
  assert.ok(!constantTimeEqual(bytes, new Uint8Array([0, 1, 0xfe, 0xfe])));
  assert.ok(!constantTimeEqual(bytes, bytes.subarray(1)));
});
