import assert from "node:assert/strict";
import type { BackendWriteOptions, BackendZeroOptions, BlockBackend } from "../lib/nbd/backend.ts";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_SIMPLE_REPLY_BYTES,
  nbdErrorName,
} from "../lib/nbd/constants.ts";
import { MemoryBackend } from "../lib/nbd/memory_backend.ts";
import { SocketReader } from "../lib/nbd/_socket.ts";
import { REQUESTS_IN_FLIGHT_MAX, TransmissionSession } from "../lib/nbd/transmission.ts";
import {
  encodeRequest,
  pattern,
  type RawNbdClient,
  type SimpleReply,
  startTestServer,
} from "./_nbd_client.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** A backend call, as recorded by {@linkcode GatedBackend}. */
interface Call {
  kind: "read" | "write" | "zero" | "trim" | "flush";
  offset: number;
  length: number;
}

interface Gate {
  match: (call: Call) => boolean;
  reached: PromiseWithResolvers<void>;
  open: PromiseWithResolvers<void>;
  used: boolean;
}

/**
 * A MemoryBackend that records every call and can hold chosen calls until the test releases
 * them: ordering is tested by what the backend has seen, never by timing.
 */
class GatedBackend implements BlockBackend {
  readonly inner: MemoryBackend;
  readonly calls: string[] = [];
  failing: ((call: Call) => boolean) | null = null;
  #gates: Gate[] = [];

  constructor(sizeBytes = 1 * MiB, readOnly = false) {
    this.inner = new MemoryBackend({ sizeBytes, readOnly });
  }
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get canMultiConn(): boolean {
    return true;
  }

  /** Holds the next call that matches; `reached` resolves when it arrives. */
  hold(match: (call: Call) => boolean): { reached: Promise<void>; release: () => void } {
    const gate: Gate = {
      match,
      reached: Promise.withResolvers<void>(),
      open: Promise.withResolvers<void>(),
      used: false,
    };
    this.#gates.push(gate);
    return { reached: gate.reached.promise, release: () => gate.open.resolve() };
  }

  async #enter(call: Call): Promise<void> {
    this.calls.push(`${call.kind}@${call.offset}+${call.length}`);
    const gate = this.#gates.find((candidate) => !candidate.used && candidate.match(call));
    if (gate) {
      gate.used = true;
      gate.reached.resolve();
      await gate.open.promise;
    }
    if (this.failing?.(call)) throw new Error(`Injected failure of ${call.kind}`);
  }

  async read(offset: number, buffer: Uint8Array): Promise<void> {
    await this.#enter({ kind: "read", offset, length: buffer.length });
    await this.inner.read(offset, buffer);
  }
  async write(offset: number, data: Uint8Array, options?: BackendWriteOptions): Promise<void> {
    await this.#enter({ kind: "write", offset, length: data.length });
    await this.inner.write(offset, data, options);
  }
  async zero(offset: number, length: number, options?: BackendZeroOptions): Promise<void> {
    await this.#enter({ kind: "zero", offset, length });
    await this.inner.zero(offset, length, options);
  }
  async trim(offset: number, length: number, options?: BackendWriteOptions): Promise<void> {
    await this.#enter({ kind: "trim", offset, length });
    await this.inner.trim(offset, length, options);
  }
  async flush(): Promise<void> {
    await this.#enter({ kind: "flush", offset: 0, length: 0 });
    await this.inner.flush();
  }
}

async function readReplies(client: RawNbdClient, count: number): Promise<Map<bigint, SimpleReply>> {
  const replies = new Map<bigint, SimpleReply>();
  for (let i = 0; i < count; i++) {
    const reply = await client.mustReadReply();
    assert.ok(!replies.has(reply.handle), `handle ${reply.handle} answered twice`);
    replies.set(reply.handle, reply);
  }
  return replies;
}

function errorOf(reply: SimpleReply | undefined): string {
  assert.ok(reply, "missing reply");
  return nbdErrorName(reply.error);
}

Deno.test("transmission: a write reads back and every reply echoes its handle", async () => {
  const t = await startTestServer();
  const client = await t.connect();
  try {
    const handle = 0xdeadbeefcafef00dn;
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle,
      offset: 4096,
      payload: pattern(64 * KiB, 0xab),
    });
    assert.deepEqual(await client.mustReadReply(), { error: 0, handle, data: new Uint8Array(0) });
    await client.sendRead(handle + 1n, 4096 - 512, 64 * KiB + 1024);
    const read = await client.mustReadReply();
    assert.equal(read.handle, handle + 1n);
    const expected = new Uint8Array(64 * KiB + 1024);
    expected.fill(0xab, 512, 512 + 64 * KiB);
    assert.deepEqual(read.data, expected);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: NBD_CMD_FLUSH and FUA reach the backend", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      flags: NBD_CMD_FLAG_FUA,
      payload: pattern(512, 1),
    });
    await client.sendRequest({ type: NBD_CMD_FLUSH, handle: 2n });
    await client.sendRequest({ type: NBD_CMD_FLUSH, handle: 3n, flags: NBD_CMD_FLAG_FUA });
    const replies = await readReplies(client, 3);
    assert.deepEqual([...replies.values()].map((reply) => reply.error), [0, 0, 0]);
    assert.equal(backend.fuaCount, 1);
    assert.equal(backend.flushCount, 2);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM zero their ranges", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  backend.bytes.fill(0xff);
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE_ZEROES,
      handle: 1n,
      offset: 0,
      length: 8192,
      flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
    });
    await client.sendRequest({ type: NBD_CMD_TRIM, handle: 2n, offset: 16384, length: 4096 });
    const replies = await readReplies(client, 2);
    assert.deepEqual([errorOf(replies.get(1n)), errorOf(replies.get(2n))], ["OK", "OK"]);
    assert.ok(backend.bytes.subarray(0, 8192).every((byte) => byte === 0));
    assert.equal(backend.bytes[8192], 0xff);
    assert.ok(backend.bytes.subarray(16384, 20480).every((byte) => byte === 0));
    assert.equal(backend.bytes[20480], 0xff);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: out-of-range requests get EINVAL or ENOSPC, the connection goes on", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRead(1n, MiB - 512, 1024);
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 2n,
      offset: MiB - 512,
      payload: pattern(1024, 9),
    });
    await client.sendRequest({ type: NBD_CMD_TRIM, handle: 3n, offset: MiB, length: 1 });
    await client.sendRequest({
      type: NBD_CMD_WRITE_ZEROES,
      handle: 4n,
      offset: 2 * MiB,
      length: 1,
    });
    await client.sendRead(5n, 0, 512);
    await client.sendRequest({ type: NBD_CMD_READ, handle: 6n, offset: 1n << 63n, length: 512 });
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 7n,
      offset: 0xffff_ffff_ffff_fe00n,
      payload: pattern(512, 9),
    });
    const replies = await readReplies(client, 7);
    assert.deepEqual(
      [1n, 2n, 3n, 4n, 5n, 6n, 7n].map((handle) => errorOf(replies.get(handle))),
      ["NBD_EINVAL", "NBD_ENOSPC", "NBD_EINVAL", "NBD_EINVAL", "OK", "NBD_EINVAL", "NBD_ENOSPC"],
    );
    assert.ok(backend.bytes.every((byte) => byte === 0), "a rejected write changed the disk");
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a read-only export answers writes with EPERM", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB, readOnly: true });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({ type: NBD_CMD_WRITE, handle: 1n, payload: pattern(4096, 1) });
    await client.sendRequest({ type: NBD_CMD_TRIM, handle: 2n, length: 4096 });
    await client.sendRequest({ type: NBD_CMD_WRITE_ZEROES, handle: 3n, length: 4096 });
    await client.sendRead(4n, 0, 4096);
    await client.sendRequest({ type: NBD_CMD_FLUSH, handle: 5n });
    const replies = await readReplies(client, 5);
    assert.deepEqual(
      [1n, 2n, 3n, 4n, 5n].map((handle) => errorOf(replies.get(handle))),
      ["NBD_EPERM", "NBD_EPERM", "NBD_EPERM", "OK", "OK"],
    );
    assert.equal(replies.get(1n)!.error, NBD_EPERM);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: unknown commands and flags get EINVAL", async () => {
  const t = await startTestServer();
  const client = await t.connect();
  try {
    const requests = [
      { type: NBD_CMD_CACHE, handle: 1n, length: 512 },
      { type: NBD_CMD_BLOCK_STATUS, handle: 2n, length: 512 },
      { type: 99, handle: 3n, length: 512 },
      { type: NBD_CMD_READ, handle: 4n, length: 512, flags: NBD_CMD_FLAG_DF },
      { type: NBD_CMD_WRITE_ZEROES, handle: 5n, length: 512, flags: NBD_CMD_FLAG_FAST_ZERO },
      { type: NBD_CMD_WRITE, handle: 6n, flags: NBD_CMD_FLAG_NO_HOLE, payload: pattern(512, 1) },
      { type: NBD_CMD_FLUSH, handle: 7n, flags: 0x8000 },
    ];
    for (const request of requests) await client.sendRequest(request);
    const replies = await readReplies(client, requests.length);
    for (const request of requests) {
      assert.equal(replies.get(request.handle)!.error, NBD_EINVAL, `handle ${request.handle}`);
    }
    // The rejected write's payload was skipped: the stream is still in sync.
    await client.sendRead(8n, 0, 512);
    const read = await client.mustReadReply();
    assert.deepEqual([read.error, read.data], [0, new Uint8Array(512)]);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a read over 32 MiB gets EINVAL, the connection goes on", async () => {
  const backend = new MemoryBackend({ sizeBytes: 64 * MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({ type: NBD_CMD_READ, handle: 1n, length: 32 * MiB + 1 });
    assert.equal((await client.mustReadReply()).error, NBD_EINVAL);
    // Zeroing and trimming carry no payload, so they may exceed the payload limit.
    await client.sendRequest({ type: NBD_CMD_WRITE_ZEROES, handle: 2n, length: 48 * MiB });
    assert.equal((await client.mustReadReply()).error, 0);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a 4 GiB write gets EINVAL, then the connection closes", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  const other = await t.connect();
  try {
    await client.sendRequest({ type: NBD_CMD_WRITE, handle: 1n, length: 0xffff_ffff });
    await client.send(pattern(64 * KiB, 0xee));
    const reply = await client.mustReadReply();
    assert.deepEqual([reply.handle, reply.error], [1n, NBD_EINVAL]);
    assert.equal(await client.isClosedByServer(), true);
    assert.ok(backend.bytes.every((byte) => byte === 0));
    await other.sendRead(2n, 0, 512);
    assert.equal((await other.mustReadReply()).error, 0);
  } finally {
    client.close();
    other.close();
    await t.close();
  }
});

Deno.test("transmission: a bad request magic closes only that connection", async () => {
  const t = await startTestServer();
  const client = await t.connect();
  const other = await t.connect();
  try {
    await client.sendRequest({ type: NBD_CMD_READ, handle: 1n, length: 512, magic: 0x12345678 });
    assert.equal(await client.isClosedByServer(), true);
    await other.sendRead(2n, 0, 512);
    assert.equal((await other.mustReadReply()).error, 0);
    assert.ok(t.events.some((event) => event.message.includes("bad request magic")));
  } finally {
    client.close();
    other.close();
    await t.close();
  }
});

Deno.test("transmission: garbage after the handshake closes the connection", async () => {
  const t = await startTestServer();
  const client = await t.connect();
  try {
    const garbage = new Uint8Array(4096);
    crypto.getRandomValues(garbage);
    await client.send(garbage);
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a truncated request or payload ends only that connection", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const t = await startTestServer({ backend });
  const survivor = await t.connect();
  try {
    const header = encodeRequest({ type: NBD_CMD_READ, handle: 1n, length: 512 });
    const truncatedHeader = await t.connect();
    await truncatedHeader.send(header.subarray(0, 13));
    truncatedHeader.close();
    const truncatedWrite = await t.connect();
    const write = encodeRequest({ type: NBD_CMD_WRITE, handle: 2n, payload: pattern(8192, 7) });
    await truncatedWrite.send(write.subarray(0, 28 + 5000));
    truncatedWrite.close();
    await survivor.sendRead(3n, 0, 8192);
    const read = await survivor.mustReadReply();
    assert.deepEqual([read.error, read.data], [0, new Uint8Array(8192)]);
  } finally {
    survivor.close();
    await t.close();
  }
});

Deno.test("transmission: zero-length requests succeed without reaching the backend", async () => {
  const backend = new GatedBackend();
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRead(1n, MiB, 0);
    await client.sendRequest({ type: NBD_CMD_WRITE, handle: 2n, offset: 0, length: 0 });
    await client.sendRequest({ type: NBD_CMD_TRIM, handle: 3n, offset: 4096, length: 0 });
    await client.sendRequest({ type: NBD_CMD_WRITE_ZEROES, handle: 4n, offset: 4096, length: 0 });
    const replies = await readReplies(client, 4);
    assert.deepEqual([...replies.values()].map((reply) => reply.error), [0, 0, 0, 0]);
    assert.deepEqual(backend.calls, []);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: replies to pipelined requests come back out of order", async () => {
  const backend = new GatedBackend();
  const slow = backend.hold((call) => call.kind === "read" && call.offset === 0);
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRead(1n, 0, 4096);
    await client.sendRead(2n, 8192, 4096);
    await slow.reached;
    const first = await client.mustReadReply();
    assert.equal(first.handle, 2n);
    slow.release();
    const second = await client.mustReadReply();
    assert.deepEqual([second.handle, second.error, second.data.length], [1n, 0, 4096]);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: overlapping writes reach the backend in the order sent", async () => {
  const backend = new GatedBackend();
  const first = backend.hold((call) => call.kind === "write" && call.offset === 0);
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 0,
      payload: pattern(8192, 1),
    });
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 2n,
      offset: 4096,
      payload: pattern(8192, 2),
    });
    await client.sendRequest({ type: NBD_CMD_TRIM, handle: 3n, offset: 6144, length: 512 });
    await client.sendRead(4n, 4096, 512); // Overlaps the writes: must see them.
    await client.sendRead(5n, 64 * KiB, 512); // Independent: completes at once.
    await first.reached;
    assert.equal((await client.mustReadReply()).handle, 5n);
    // Requests 2, 3 and 4 were admitted before 5 was answered, yet none reached the backend.
    assert.deepEqual(backend.calls, ["write@0+8192", "read@65536+512"]);
    first.release();
    const replies = await readReplies(client, 4);
    assert.deepEqual(backend.calls.slice(2), ["write@4096+8192", "trim@6144+512", "read@4096+512"]);
    assert.deepEqual(replies.get(4n)!.data, pattern(512, 2));
    const bytes = backend.inner.bytes;
    assert.deepEqual(
      [bytes[4095], bytes[4096], bytes[6143], bytes[6144], bytes[6656], bytes[12287]],
      [1, 2, 2, 0, 2, 2],
    );
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: NBD_CMD_FLUSH waits for the writes sent before it", async () => {
  const backend = new GatedBackend();
  const write = backend.hold((call) => call.kind === "write");
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 0,
      payload: pattern(512, 1),
    });
    await client.sendRequest({ type: NBD_CMD_FLUSH, handle: 2n });
    await client.sendRead(3n, 8192, 512);
    await write.reached;
    assert.equal((await client.mustReadReply()).handle, 3n);
    assert.equal(backend.inner.flushCount, 0);
    write.release();
    const replies = await readReplies(client, 2);
    assert.deepEqual([errorOf(replies.get(1n)), errorOf(replies.get(2n))], ["OK", "OK"]);
    assert.deepEqual(backend.calls, ["write@0+512", "read@8192+512", "flush@0+0"]);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: NBD_CMD_DISC finishes requests in flight before closing", async () => {
  const backend = new GatedBackend();
  const write = backend.hold((call) => call.kind === "write");
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 0,
      payload: pattern(512, 5),
    });
    await client.sendRequest({ type: NBD_CMD_DISC, handle: 2n });
    await write.reached;
    write.release();
    const reply = await client.mustReadReply();
    assert.deepEqual([reply.handle, reply.error], [1n, 0]);
    assert.equal(await client.isClosedByServer(), true);
    assert.equal(backend.inner.bytes[511], 5);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a backend error becomes EIO and the connection goes on", async () => {
  const backend = new GatedBackend();
  backend.failing = (call) => call.offset === 4096;
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 4096,
      payload: pattern(512, 1),
    });
    await client.sendRead(2n, 4096, 512);
    await client.sendRead(3n, 0, 512);
    const replies = await readReplies(client, 3);
    assert.deepEqual(
      [1n, 2n, 3n].map((handle) => replies.get(handle)!.error),
      [NBD_EIO, NBD_EIO, 0],
    );
    assert.ok(t.events.some((event) => event.level === "error"));
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: more pipelined requests than the in-flight limit all complete", async () => {
  const backend = new MemoryBackend({ sizeBytes: 4 * MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    const count = REQUESTS_IN_FLIGHT_MAX * 5;
    const requests = [];
    for (let i = 0; i < count; i++) {
      const payload = pattern(4096 + (i % 3) * 512, i & 0xff);
      requests.push(
        encodeRequest({ type: NBD_CMD_WRITE, handle: BigInt(i), offset: i * 8192, payload }),
      );
    }
    const batch = new Uint8Array(requests.reduce((sum, request) => sum + request.length, 0));
    let at = 0;
    for (const request of requests) {
      batch.set(request, at);
      at += request.length;
    }
    const [replies] = await Promise.all([readReplies(client, count), client.send(batch)]);
    assert.equal(replies.size, count);
    assert.ok([...replies.values()].every((reply) => reply.error === 0));
    for (let i = 0; i < count; i++) {
      assert.equal(backend.bytes[i * 8192 + 4095], i & 0xff, `write ${i}`);
    }
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: writes on one connection are visible on another", async () => {
  const t = await startTestServer();
  const writer = await t.connect();
  const reader = await t.connect();
  try {
    await writer.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 512,
      payload: pattern(512, 3),
    });
    assert.equal((await writer.mustReadReply()).error, 0);
    await reader.sendRead(2n, 512, 512);
    assert.deepEqual((await reader.mustReadReply()).data, pattern(512, 3));
  } finally {
    writer.close();
    reader.close();
    await t.close();
  }
});

Deno.test("transmission: close() lets requests in flight finish, then closes", async () => {
  const backend = new GatedBackend();
  const write = backend.hold((call) => call.kind === "write");
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 0,
      payload: pattern(512, 4),
    });
    await write.reached;
    const closing = t.server.close();
    write.release();
    const reply = await client.mustReadReply();
    assert.deepEqual([reply.handle, reply.error], [1n, 0]);
    assert.equal(await client.isClosedByServer(), true);
    await closing;
    assert.equal(t.server.connectionCount, 0);
    assert.equal(backend.inner.bytes[0], 4);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a client that leaves without reading its replies frees its slot", async () => {
  const backend = new MemoryBackend({ sizeBytes: 8 * MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    // 64 MiB of read replies: far more than the socket buffers hold, so reply writes fail.
    for (let i = 0; i < 64; i++) await client.sendRead(BigInt(i), (i % 8) * MiB, MiB);
  } finally {
    client.close();
  }
  // close() waits for every connection: it would hang if failed writes leaked in-flight slots.
  await t.close();
  assert.equal(t.server.connectionCount, 0);
});

Deno.test("transmission: error names come from the constants table", () => {
  assert.deepEqual(
    [NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, NBD_EIO, 0, 12345].map(nbdErrorName),
    ["NBD_EINVAL", "NBD_ENOSPC", "NBD_EPERM", "NBD_EIO", "OK", "NBD_E?(12345)"],
  );
});

/**
 * A `Deno.Conn` stand-in for one {@linkcode TransmissionSession}: the test feeds the bytes the
 * server reads, one pushed chunk per read at most, and sees every write the server makes, so
 * that how replies are grouped into writes can be checked exactly.
 */
class ScriptedConn {
  readonly writes: Uint8Array[] = [];
  #incoming: Uint8Array[] = [];
  #ended = false;
  #pendingRead: { buffer: Uint8Array; resolve: (count: number | null) => void } | null = null;

  /** True while the server waits in `read()` for bytes the test has not pushed yet. */
  get readPending(): boolean {
    return this.#pendingRead !== null;
  }

  push(...requests: Uint8Array[]): void {
    const chunk = new Uint8Array(requests.reduce((sum, request) => sum + request.length, 0));
    let at = 0;
    for (const request of requests) {
      chunk.set(request, at);
      at += request.length;
    }
    this.#incoming.push(chunk);
    this.#serveRead();
  }

  end(): void {
    this.#ended = true;
    this.#serveRead();
  }

  read(buffer: Uint8Array): Promise<number | null> {
    assert.equal(this.#pendingRead, null, "concurrent reads");
    const { promise, resolve } = Promise.withResolvers<number | null>();
    this.#pendingRead = { buffer, resolve };
    this.#serveRead();
    return promise;
  }

  write(bytes: Uint8Array): Promise<number> {
    this.writes.push(bytes.slice());
    return Promise.resolve(bytes.length);
  }

  close(): void {}

  #serveRead(): void {
    const pending = this.#pendingRead;
    if (pending === null) return;
    const chunk = this.#incoming[0];
    if (chunk === undefined && !this.#ended) return;
    this.#pendingRead = null;
    if (chunk === undefined) return pending.resolve(null);
    const count = Math.min(chunk.length, pending.buffer.length);
    pending.buffer.set(chunk.subarray(0, count));
    if (count === chunk.length) this.#incoming.shift();
    else this.#incoming[0] = chunk.subarray(count);
    pending.resolve(count);
  }
}

/** A session over a {@linkcode ScriptedConn}, already reading. */
function startScriptedSession(backend: BlockBackend) {
  const conn = new ScriptedConn();
  const fakeConn = conn as unknown as Deno.Conn;
  const session = new TransmissionSession(fakeConn, new SocketReader(fakeConn), { backend });
  return { conn, session, running: session.run() };
}

/** Lets every pending microtask and zero-delay callback run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** Splits the bytes of `writes` into simple replies; `readLengths` gives READ data lengths. */
function decodeReplies(writes: Uint8Array[], readLengths: Map<bigint, number>): SimpleReply[] {
  const bytes = new Uint8Array(writes.reduce((sum, write) => sum + write.length, 0));
  let at = 0;
  for (const write of writes) {
    bytes.set(write, at);
    at += write.length;
  }
  const view = new DataView(bytes.buffer);
  const replies: SimpleReply[] = [];
  for (at = 0; at < bytes.length;) {
    const error = view.getUint32(at + 4);
    const handle = view.getBigUint64(at + 8);
    const dataBytes = error === 0 ? readLengths.get(handle) ?? 0 : 0;
    at += NBD_SIMPLE_REPLY_BYTES;
    replies.push({ error, handle, data: bytes.slice(at, at + dataBytes) });
    at += dataBytes;
  }
  assert.equal(at, bytes.length, "a reply was cut short");
  return replies;
}

Deno.test("transmission: replies to requests that arrive together leave in one write", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  const { conn, running } = startScriptedSession(backend);
  const requests: Uint8Array[] = [];
  const readLengths = new Map<bigint, number>();
  for (let i = 0; i < 16; i++) {
    const payload = pattern(4096, i + 1);
    requests.push(
      encodeRequest({ type: NBD_CMD_WRITE, handle: BigInt(i), offset: i * 4096, payload }),
    );
    const handle = BigInt(100 + i);
    readLengths.set(handle, 512);
    requests.push(
      encodeRequest({ type: NBD_CMD_READ, handle, offset: 64 * KiB + i * 512, length: 512 }),
    );
  }
  conn.push(...requests);
  await settle();
  assert.equal(conn.writes.length, 1, "the 32 replies were split over several writes");
  assert.ok(conn.readPending);
  const replies = decodeReplies(conn.writes, readLengths);
  assert.equal(replies.length, 32);
  assert.ok(replies.every((reply) => reply.error === 0));
  assert.equal(new Set(replies.map((reply) => reply.handle)).size, 32);
  assert.equal(backend.bytes[15 * 4096], 16);
  conn.end();
  await running;
});

Deno.test("transmission: a lone request is answered before the server waits for the next", async () => {
  const backend = new MemoryBackend({ sizeBytes: MiB });
  backend.bytes.fill(7, 0, 512);
  const { conn, running } = startScriptedSession(backend);
  conn.push(encodeRequest({ type: NBD_CMD_READ, handle: 1n, offset: 0, length: 512 }));
  await settle();
  // The server waits in read() for the next request and has already sent this reply.
  assert.ok(conn.readPending);
  assert.deepEqual(decodeReplies(conn.writes, new Map([[1n, 512]])), [
    { error: 0, handle: 1n, data: pattern(512, 7) },
  ]);
  conn.push(encodeRequest({ type: NBD_CMD_WRITE, handle: 2n, payload: pattern(512, 1) }));
  await settle();
  assert.equal(conn.writes.length, 2);
  conn.end();
  await running;
});

Deno.test("transmission: a request that completes while the reader waits is answered at once", async () => {
  const backend = new GatedBackend();
  const write = backend.hold((call) => call.kind === "write");
  const { conn, running } = startScriptedSession(backend);
  conn.push(
    encodeRequest({ type: NBD_CMD_WRITE, handle: 1n, offset: 0, payload: pattern(4096, 1) }),
    encodeRequest({ type: NBD_CMD_READ, handle: 2n, offset: 8192, length: 512 }),
  );
  await write.reached;
  await settle();
  assert.deepEqual(decodeReplies(conn.writes, new Map([[2n, 512]])).map((reply) => reply.handle), [
    2n,
  ]);
  write.release();
  await settle();
  assert.deepEqual(decodeReplies(conn.writes, new Map([[2n, 512]])).map((reply) => reply.handle), [
    2n,
    1n,
  ]);
  conn.end();
  await running;
});

/** A MemoryBackend that remembers which ArrayBuffers the server lent it. */
class BufferTrackingBackend extends MemoryBackend {
  readonly buffersSeen = new Set<ArrayBufferLike>();

  override read(offsetBytes: number, buffer: Uint8Array): Promise<void> {
    this.buffersSeen.add(buffer.buffer);
    return super.read(offsetBytes, buffer);
  }

  override write(
    offsetBytes: number,
    data: Uint8Array,
    options?: BackendWriteOptions,
  ): Promise<void> {
    this.buffersSeen.add(data.buffer);
    return super.write(offsetBytes, data, options);
  }
}

Deno.test("transmission: one request after another reuses one pooled buffer", async () => {
  const backend = new BufferTrackingBackend({ sizeBytes: 4 * MiB });
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    for (let i = 0; i < 16; i++) {
      const offset = i * 64 * KiB;
      await client.sendRequest({
        type: NBD_CMD_WRITE,
        handle: 1n,
        offset,
        payload: pattern(64 * KiB, i),
      });
      assert.equal((await client.mustReadReply()).error, 0);
      await client.sendRead(2n, offset, 64 * KiB);
      assert.deepEqual((await client.mustReadReply()).data, pattern(64 * KiB, i));
    }
    assert.equal(backend.buffersSeen.size, 1);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: a write's buffer is not reused while the backend holds it", async () => {
  const backend = new GatedBackend();
  const held = backend.hold((call) => call.kind === "write" && call.offset === 0);
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    await client.sendRequest({
      type: NBD_CMD_WRITE,
      handle: 1n,
      offset: 0,
      payload: pattern(8192, 1),
    });
    await held.reached;
    // Same size class, completed while the first is held: each takes a buffer of its own.
    for (let i = 0; i < 8; i++) {
      const offset = (i + 1) * 8192;
      await client.sendRequest({
        type: NBD_CMD_WRITE,
        handle: 2n,
        offset,
        payload: pattern(8192, 2),
      });
      assert.equal((await client.mustReadReply()).handle, 2n);
    }
    held.release();
    assert.deepEqual(await client.mustReadReply(), {
      error: 0,
      handle: 1n,
      data: new Uint8Array(0),
    });
    assert.deepEqual(backend.inner.bytes.subarray(0, 8192), pattern(8192, 1));
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("transmission: reads of every reply size come back whole", async () => {
  const sizes = [1, 512, 4096, 4097, 16 * KiB, 16 * KiB + 1, 64 * KiB, MiB, MiB + 1];
  const backend = new MemoryBackend({ sizeBytes: 16 * MiB });
  sizes.forEach((size, i) => backend.bytes.fill(i + 1, i * MiB, i * MiB + size));
  const t = await startTestServer({ backend });
  const client = await t.connect();
  try {
    // Pipelined, so that small replies share the batch while large ones go out on their own.
    for (const [i, size] of sizes.entries()) await client.sendRead(BigInt(i), i * MiB, size);
    const replies = await readReplies(client, sizes.length);
    for (const [i, size] of sizes.entries()) {
      const reply = replies.get(BigInt(i))!;
      assert.equal(reply.error, 0);
      assert.deepEqual(reply.data, pattern(size, i + 1), `read of ${size} bytes`);
    }
  } finally {
    client.close();
    await t.close();
  }
});
