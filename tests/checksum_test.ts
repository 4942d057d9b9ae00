import assert from "node:assert/strict";
import {
  crc32c,
  CRC32C_IMPLEMENTATION,
  crc32cCombine,
  crc32cHex,
  crc32cOfZeros,
  Crc32cStream,
} from "../lib/checksum.ts";
import { withSeed } from "./_helpers.ts";

Deno.test("crc32c() gives the standard check value", () => {
  assert.equal(crc32c(new TextEncoder().encode("123456789")), 0xe3069283);
});

Deno.test("crc32c() of the native addon and of the WebAssembly fallback agree", async () => {
  await withSeed(async (random) => {
    const samples = [0, 1, 60, 4096, 100_003].map((length) => {
      const bytes = new Uint8Array(length);
      random.fill(bytes);
      return bytes;
    });
    const script = `
      import { CRC32C_IMPLEMENTATION, crc32c } from "./lib/checksum.ts";
      const samples = JSON.parse(await new Response(Deno.stdin.readable).text());
      console.log(JSON.stringify([CRC32C_IMPLEMENTATION, ...samples.map((s) => crc32c(new Uint8Array(s)))]));
    `;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", script],
      env: { SECTORLOG_CRC32C: "wasm" },
      stdin: "piped",
      stdout: "piped",
    }).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(JSON.stringify(samples.map((s) => [...s]))));
    await writer.close();
    const [implementation, ...wasm] = JSON.parse(
      new TextDecoder().decode((await child.output()).stdout),
    );
    assert.equal(implementation, "wasm");
    assert.deepEqual(
      samples.map((s) => crc32c(s)),
      wasm,
      `this process uses ${CRC32C_IMPLEMENTATION}`,
    );
  });
});

Deno.test("Crc32cStream and crc32cCombine() agree with one-shot crc32c()", async () => {
  await withSeed(async (random) => {
    const bytes = new Uint8Array(50_000);
    random.fill(bytes.subarray(0, 30_000)); // the tail stays zero
    const stream = new Crc32cStream();
    await stream.init();
    let combined = 0;
    for (let at = 0; at < bytes.length; at += 7_777) {
      const piece = bytes.subarray(at, Math.min(at + 7_777, bytes.length));
      stream.update(piece);
      combined = crc32cCombine(combined, crc32c(piece), piece.length);
    }
    const expected = crc32c(bytes);
    assert.equal(stream.digestHex(), expected.toString(16).padStart(8, "0"));
    assert.equal(combined, expected);
    const withZeros = crc32cCombine(
      crc32c(bytes.subarray(0, 30_000)),
      crc32cOfZeros(20_000),
      20_000,
    );
    assert.equal(withZeros, expected);
  });
});

Deno.test("crc32cOfZeros() and crc32cCombine() stay right past 512 MiB and 4 GiB", async () => {
  // The check streams real zero bytes through the ordinary CRC, so it shares no code with the
  // arithmetic it checks. (zlib's 32-entry table wrap is wrong for CRC32C from 2^29 bytes on.)
  const chunk = new Uint8Array(8 * 1024 * 1024);
  const checkpoints = [2 ** 29 + 4096 * 3 + 7, 2 ** 30 + 1, 2 ** 32 + 12_345];
  for (const target of checkpoints) {
    const stream = new Crc32cStream(); // one per length: the wasm hasher ends at its digest
    await stream.init();
    let streamed = 0;
    while (streamed < target) {
      const length = Math.min(chunk.length, target - streamed);
      stream.update(chunk.subarray(0, length));
      streamed += length;
    }
    const expected = stream.digestHex();
    assert.equal(crc32cHex(crc32cOfZeros(target)), expected, `${target} zero bytes`);
    const head = 12_345;
    const combined = crc32cCombine(
      crc32cOfZeros(head),
      crc32cOfZeros(target - head),
      target - head,
    );
    assert.equal(crc32cHex(combined), expected, `combined to ${target} bytes`);
  }
});
