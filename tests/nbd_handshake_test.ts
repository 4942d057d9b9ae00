import assert from "node:assert/strict";
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_SERVER,
  nbdOptionName,
  nbdReplyName,
} from "../lib/nbd/constants.ts";
import { OPTIONS_PER_CONNECTION_MAX } from "../lib/nbd/handshake.ts";
import { MemoryBackend } from "../lib/nbd/memory_backend.ts";
import {
  encodeInfoRequest,
  type OptionReply,
  RawNbdClient,
  startTestServer,
} from "./_nbd_client.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const FLAGS_ALWAYS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;

function infoItems(replies: OptionReply[]): Map<number, DataView> {
  const items = new Map<number, DataView>();
  for (const reply of replies) {
    if (reply.type !== NBD_REP_INFO) continue;
    const view = new DataView(reply.data.buffer);
    items.set(view.getUint16(0), view);
  }
  return items;
}

function replyTypes(replies: OptionReply[]): string[] {
  return replies.map((reply) => nbdReplyName(reply.type));
}

Deno.test("handshake: greeting advertises fixed newstyle and no zeroes", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    const greeting = await client.readGreeting();
    assert.equal(greeting.magic, NBD_MAGIC);
    assert.equal(greeting.option, NBD_IHAVEOPT);
    assert.equal(greeting.flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: unknown client flags drop the connection", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake(NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: NBD_OPT_LIST names the export, and rejects data", async () => {
  const t = await startTestServer({ exportName: "disk0" });
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(NBD_OPT_LIST);
    const replies = await client.readOptionReplies();
    assert.deepEqual(replyTypes(replies), ["NBD_REP_SERVER", "NBD_REP_ACK"]);
    assert.equal(replies[0].type, NBD_REP_SERVER);
    const view = new DataView(replies[0].data.buffer);
    assert.equal(view.getUint32(0), 5);
    assert.equal(decoder.decode(replies[0].data.subarray(4)), "disk0");

    await client.sendOption(NBD_OPT_LIST, encoder.encode("x"));
    assert.deepEqual(replyTypes(await client.readOptionReplies()), ["NBD_REP_ERR_INVALID"]);
    // The handshake goes on after an error reply.
    const { sizeBytes } = await client.go("disk0");
    assert.equal(sizeBytes, 1024n * 1024n);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: NBD_OPT_INFO sends export, block size, name and description", async () => {
  const t = await startTestServer({ description: "test disk" });
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(
      NBD_OPT_INFO,
      encodeInfoRequest("", [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE, 999]),
    );
    const replies = await client.readOptionReplies();
    assert.equal(replies.at(-1)!.type, NBD_REP_ACK);
    assert.ok(replies.every((reply) => reply.option === NBD_OPT_INFO));
    const items = infoItems(replies);
    const exportInfo = items.get(NBD_INFO_EXPORT)!;
    assert.equal(exportInfo.byteLength, 12);
    assert.equal(exportInfo.getBigUint64(2), 1024n * 1024n);
    assert.equal(exportInfo.getUint16(10), FLAGS_ALWAYS | NBD_FLAG_CAN_MULTI_CONN);
    const blockSize = items.get(NBD_INFO_BLOCK_SIZE)!;
    assert.equal(blockSize.byteLength, 14);
    assert.deepEqual(
      [blockSize.getUint32(2), blockSize.getUint32(6), blockSize.getUint32(10)],
      [1, 4096, 32 * 1024 * 1024],
    );
    assert.equal(items.get(NBD_INFO_NAME)!.byteLength, 2);
    const description = items.get(NBD_INFO_DESCRIPTION)!;
    assert.equal(decoder.decode(new Uint8Array(description.buffer).subarray(2)), "test disk");
    // INFO does not enter transmission: GO still works.
    await client.go("");
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: NBD_INFO_EXPORT is sent even when not requested", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    const { sizeBytes, flags } = await client.go("", []);
    assert.equal(sizeBytes, 1024n * 1024n);
    assert.equal(flags & FLAGS_ALWAYS, FLAGS_ALWAYS);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: unknown export gets NBD_REP_ERR_UNKNOWN and the handshake goes on", async () => {
  const t = await startTestServer({ exportName: "disk0" });
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    for (const option of [NBD_OPT_INFO, NBD_OPT_GO]) {
      await client.sendOption(option, encodeInfoRequest(""));
      const replies = await client.readOptionReplies();
      assert.deepEqual(replyTypes(replies), ["NBD_REP_ERR_UNKNOWN"]);
      assert.equal(replies[0].type, NBD_REP_ERR_UNKNOWN);
    }
    await client.go("disk0");
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: malformed NBD_OPT_INFO data gets NBD_REP_ERR_INVALID", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    const tooLongName = encodeInfoRequest("");
    new DataView(tooLongName.buffer).setUint32(0, 100);
    const cases = [new Uint8Array(3), tooLongName, new Uint8Array([0, 0, 0, 0, 0, 2, 0, 0])];
    for (const data of cases) {
      await client.sendOption(NBD_OPT_GO, data);
      assert.deepEqual(
        (await client.readOptionReplies()).map((reply) => reply.type),
        [NBD_REP_ERR_INVALID],
      );
    }
    await client.go("");
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: unsupported options get NBD_REP_ERR_UNSUP", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    const options = [
      NBD_OPT_STRUCTURED_REPLY,
      NBD_OPT_STARTTLS,
      NBD_OPT_LIST_META_CONTEXT,
      NBD_OPT_SET_META_CONTEXT,
      NBD_OPT_EXTENDED_HEADERS,
      4,
      12345,
    ];
    for (const option of options) {
      await client.sendOption(option);
      const replies = await client.readOptionReplies();
      assert.deepEqual(replyTypes(replies), ["NBD_REP_ERR_UNSUP"], nbdOptionName(option));
      assert.equal(replies[0].type, NBD_REP_ERR_UNSUP);
      assert.equal(replies[0].option, option);
    }
    await client.go("");
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: an oversized option gets NBD_REP_ERR_TOO_BIG and a disconnect", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(NBD_OPT_GO, new Uint8Array(0), 0x40000000);
    const reply = await client.readOptionReply();
    assert.equal(reply?.type, NBD_REP_ERR_TOO_BIG);
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: NBD_OPT_EXPORT_NAME sends 124 zero bytes unless NO_ZEROES", async () => {
  const t = await startTestServer();
  for (const noZeroes of [false, true]) {
    const client = await RawNbdClient.connect(t.socketPath);
    try {
      await client.startHandshake(
        NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0),
      );
      await client.sendOption(NBD_OPT_EXPORT_NAME, new Uint8Array(0));
      const reply = await client.mustRead(10 + (noZeroes ? 0 : 124));
      const view = new DataView(reply.buffer);
      assert.equal(view.getBigUint64(0), 1024n * 1024n);
      assert.equal(view.getUint16(8), FLAGS_ALWAYS | NBD_FLAG_CAN_MULTI_CONN);
      assert.ok(reply.subarray(10).every((byte) => byte === 0));
      // Transmission follows right away: the next bytes are replies.
      await client.sendRead(7n, 0, 512);
      const read = await client.mustReadReply();
      assert.deepEqual([read.error, read.handle, read.data.length], [0, 7n, 512]);
    } finally {
      client.close();
    }
  }
  await t.close();
});

Deno.test("handshake: NBD_OPT_EXPORT_NAME with an unknown name disconnects", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(NBD_OPT_EXPORT_NAME, encoder.encode("nope"));
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: NBD_OPT_ABORT is acknowledged, then the connection closes", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(NBD_OPT_ABORT);
    const reply = await client.readOptionReply();
    assert.deepEqual([reply?.option, reply?.type], [NBD_OPT_ABORT, NBD_REP_ACK]);
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: an option without IHAVEOPT disconnects", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.send(encoder.encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: too many options disconnect", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    for (let i = 0; i < OPTIONS_PER_CONNECTION_MAX; i++) {
      await client.sendOption(NBD_OPT_STRUCTURED_REPLY);
      assert.equal((await client.readOptionReply())?.type, NBD_REP_ERR_UNSUP);
    }
    await client.sendOption(NBD_OPT_STRUCTURED_REPLY);
    assert.equal(await client.isClosedByServer(), true);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: a silent client is disconnected after the handshake limit", async () => {
  const t = await startTestServer({ handshakeMsMax: 50 });
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.readGreeting();
    assert.equal(await client.isClosedByServer(), true);
    assert.ok(t.events.some((event) => event.message.includes("handshake took too long")));
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: read-only and single-connection backends change the flags", async () => {
  const backend = new MemoryBackend({ sizeBytes: 4096, readOnly: true, canMultiConn: false });
  const t = await startTestServer({ backend });
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    const { sizeBytes, flags } = await client.go();
    assert.equal(sizeBytes, 4096n);
    assert.equal(flags, FLAGS_ALWAYS | NBD_FLAG_READ_ONLY);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: connections beyond the limit are refused, others keep working", async () => {
  const t = await startTestServer({ connectionsMax: 1 });
  const first = await t.connect();
  const second = await RawNbdClient.connect(t.socketPath);
  try {
    assert.equal(await second.readExact(18), null);
    await first.sendRead(1n, 0, 4096);
    assert.equal((await first.mustReadReply()).error, 0);
  } finally {
    first.close();
    second.close();
    await t.close();
  }
});

Deno.test("handshake: close() ends connections in handshake and removes the socket", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.readGreeting();
    await t.server.close();
    assert.equal(await client.isClosedByServer(), true);
    await assert.rejects(Deno.stat(t.socketPath), Deno.errors.NotFound);
  } finally {
    client.close();
    await t.close();
  }
});

Deno.test("handshake: an option number with bit 31 set is echoed in NBD_REP_ERR_UNSUP", async () => {
  const t = await startTestServer();
  const client = await RawNbdClient.connect(t.socketPath);
  try {
    await client.startHandshake();
    await client.sendOption(0x80000001);
    const reply = await client.readOptionReply();
    assert.deepEqual([reply?.option, reply?.type], [0x80000001, NBD_REP_ERR_UNSUP]);
  } finally {
    client.close();
    await t.close();
  }
});
