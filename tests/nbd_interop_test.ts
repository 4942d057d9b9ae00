/**
 * The NBD server against real clients: libnbd's nbdinfo and nbdcopy, qemu-io, qemu-img, and fio's
 * nbd engine. Each test is skipped, with the reason printed, when its tool is not installed.
 */

import assert from "node:assert/strict";
import { MemoryBackend } from "../lib/nbd/memory_backend.ts";
import { startTestServer } from "./_nbd_client.ts";

const MiB = 1024 * 1024;

function missing(tool: string): boolean {
  const found = new Deno.Command("sh", { args: ["-c", `command -v ${tool}`], stdout: "null" })
    .outputSync().success;
  if (!found) console.log(`Skipping tests that need ${tool}: it is not installed`);
  return !found;
}

const noNbdinfo = missing("nbdinfo");
const noNbdcopy = missing("nbdcopy");
const noQemuIo = missing("qemu-io");
const noQemuImg = missing("qemu-img");
const noFio = missing("fio");

async function run(
  command: string,
  args: string[],
  cwd?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(command, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

async function mustRun(command: string, args: string[], cwd?: string): Promise<string> {
  const result = await run(command, args, cwd);
  assert.equal(
    result.code,
    0,
    `${command} ${args.join(" ")} failed:\n${result.stdout}\n${result.stderr}`,
  );
  return result.stdout;
}

function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let at = 0; at < length; at += 65536) {
    crypto.getRandomValues(bytes.subarray(at, Math.min(length, at + 65536)));
  }
  return bytes;
}

Deno.test({
  name: "interop: nbdinfo --json reports the size and the flags",
  ignore: noNbdinfo,
  async fn() {
    const t = await startTestServer({
      backend: new MemoryBackend({ sizeBytes: 32 * MiB }),
      description: "sectorlog test disk",
    });
    try {
      const info = JSON.parse(await mustRun("nbdinfo", ["--json", t.uri]));
      const exported = info.exports[0];
      assert.equal(info.protocol, "newstyle-fixed");
      assert.equal(exported["export-size"], 32 * MiB);
      assert.equal(exported.description, "sectorlog test disk");
      assert.deepEqual(
        [exported.can_flush, exported.can_fua, exported.can_trim, exported.can_zero],
        [true, true, true, true],
      );
      assert.deepEqual([exported.is_read_only, exported.can_multi_conn], [false, true]);
      assert.equal(exported.block_size_minimum, 1);
      assert.equal(exported.block_size_maximum, 32 * MiB);
      assert.match(await mustRun("nbdinfo", ["--list", t.uri]), /export-size: 33554432/);
    } finally {
      await t.close();
    }
  },
});

Deno.test({
  name: "interop: nbdinfo sees a named, read-only export",
  ignore: noNbdinfo,
  async fn() {
    const backend = new MemoryBackend({ sizeBytes: MiB, readOnly: true, canMultiConn: false });
    const t = await startTestServer({ backend, exportName: "past" });
    try {
      const info = JSON.parse(await mustRun("nbdinfo", ["--json", t.uri]));
      assert.equal(info.exports[0]["export-name"], "past");
      assert.deepEqual(
        [info.exports[0].is_read_only, info.exports[0].can_multi_conn],
        [true, false],
      );
      const wrongName = t.uri.replace("/past?", "/other?");
      assert.notEqual((await run("nbdinfo", ["--json", wrongName])).code, 0);
    } finally {
      await t.close();
    }
  },
});

Deno.test({
  name: "interop: qemu-io writes patterns, zeroes and discards, and reads them back",
  ignore: noQemuIo,
  async fn() {
    const backend = new MemoryBackend({ sizeBytes: 16 * MiB });
    const t = await startTestServer({ backend });
    try {
      const commands = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0xcd 1M 1M",
        "write -z 1M 4k",
        "read -P 0 1M 4k",
        "read -P 0xcd 1028k 1020k",
        "discard 0 4k",
        "read -P 0 0 4k",
        "write -P 0x11 -f 8M 512",
        "aio_write -P 0x22 9M 64k",
        "aio_write -P 0x33 10M 64k",
        "aio_flush",
        "flush",
        "read -P 0x22 9M 64k",
      ];
      const output = await mustRun("qemu-io", [
        "-f",
        "raw",
        t.uri,
        ...commands.flatMap((command) => ["-c", command]),
      ]);
      assert.doesNotMatch(output, /fail|error/i);
      assert.deepEqual(
        [backend.bytes[4096], backend.bytes[0], backend.bytes[MiB], backend.bytes[MiB + 4096]],
        [0xab, 0, 0, 0xcd],
      );
      assert.deepEqual([backend.bytes[8 * MiB], backend.bytes[10 * MiB + 65535]], [0x11, 0x33]);
      assert.ok(backend.flushCount >= 1);
    } finally {
      await t.close();
    }
  },
});

Deno.test({
  name: "interop: qemu-io cannot write to a read-only export",
  ignore: noQemuIo,
  async fn() {
    const backend = new MemoryBackend({ sizeBytes: MiB, readOnly: true });
    const t = await startTestServer({ backend });
    try {
      const result = await run("qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", t.uri]);
      assert.match(result.stdout + result.stderr, /read-only|Operation not permitted|denied/i);
      assert.ok(backend.bytes.every((byte) => byte === 0));
    } finally {
      await t.close();
    }
  },
});

Deno.test({
  name: "interop: qemu-img convert copies the export to a file",
  ignore: noQemuImg,
  async fn() {
    const backend = new MemoryBackend({ sizeBytes: 8 * MiB });
    backend.bytes.set(randomBytes(8 * MiB));
    const t = await startTestServer({ backend });
    try {
      const info = JSON.parse(await mustRun("qemu-img", ["info", "--output=json", t.uri]));
      assert.equal(info["virtual-size"], 8 * MiB);
      const output = `${t.dir}/copy.img`;
      await mustRun("qemu-img", ["convert", "-f", "raw", "-O", "raw", t.uri, output]);
      assert.deepEqual(await Deno.readFile(output), backend.bytes);
    } finally {
      await t.close();
    }
  },
});

Deno.test({
  name: "interop: nbdcopy copies a file in and back out unchanged",
  ignore: noNbdcopy,
  async fn() {
    const backend = new MemoryBackend({ sizeBytes: 24 * MiB });
    const t = await startTestServer({ backend });
    try {
      const source = randomBytes(24 * MiB);
      source.fill(0, 4 * MiB, 8 * MiB); // A run of zeroes, which nbdcopy sends as WRITE_ZEROES.
      backend.bytes.fill(0x5a, 4 * MiB, 8 * MiB);
      const input = `${t.dir}/in.img`;
      const output = `${t.dir}/out.img`;
      await Deno.writeFile(input, source);
      await mustRun("nbdcopy", [input, t.uri]);
      assert.ok(backend.bytes.every((byte, i) => byte === source[i]), "export differs from input");
      await mustRun("nbdcopy", [t.uri, output]);
      assert.deepEqual(await Deno.readFile(output), source);
    } finally {
      await t.close();
    }
  },
});

for (const blockSize of ["4k", "1M"]) {
  Deno.test({
    name: `interop: fio randwrite bs=${blockSize} iodepth=16 verifies with crc32c`,
    ignore: noFio,
    async fn() {
      const t = await startTestServer({ backend: new MemoryBackend({ sizeBytes: 32 * MiB }) });
      try {
        const output = await mustRun("fio", [
          "--name=nbd",
          "--ioengine=nbd",
          `--uri=${t.uri}`,
          "--rw=randwrite",
          `--bs=${blockSize}`,
          "--iodepth=16",
          "--size=32M",
          "--verify=crc32c",
          "--do_verify=1",
          "--verify_fatal=1",
          // fio would otherwise leave local-nbd-0-verify.state in its working directory.
          "--verify_state_save=0",
        ], t.dir);
        assert.match(output, /err= 0/);
        assert.doesNotMatch(output, /verify: bad|crc32c: verify failed/i);
      } finally {
        await t.close();
      }
    },
  });
}
