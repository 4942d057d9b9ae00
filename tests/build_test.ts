/**
 * The single executable of `deno task build` passes the same black-box checks as
 * `deno run cli/main.ts`: versions, snapshot + restore, DESIGN.md's exit codes (0 done, 2 usage,
 * 3 integrity, 4 busy), and watch serving NBD and stopping cleanly on SIGTERM, as systemd stops
 * it. The binary is built once per run into a temp dir (a few seconds), so it is never stale.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { NBD_CMD_FLUSH, NBD_CMD_WRITE } from "../lib/nbd/constants.ts";
import {
  assertFilesEqual,
  BackgroundProcess,
  CLI_MAIN,
  type CommandResult,
  makeSparseImage,
  run,
  runOk,
  skipReason,
  waitFor,
  withTempDir,
} from "./_watch_harness.ts";
import { RawNbdClient } from "./_nbd_client.ts";

const MiB = 1024 * 1024;
/** Bundling, compressing the runtime and writing ~40 MiB take seconds; allow for a slow disk. */
const BUILD_MS_MAX = 180_000;

let built: Promise<string> | undefined;
let buildDir: string | undefined;

/** Builds the executable once for this test file (into a temp dir removed at exit). */
function builtBinary(): Promise<string> {
  built ??= (async () => {
    buildDir = await Deno.makeTempDir({ prefix: "sectorlog-binary-" });
    const binary = join(buildDir, "sectorlog");
    await runOk(Deno.execPath(), ["run", "-A", "scripts/build.ts", "--output", binary], {
      timeoutMs: BUILD_MS_MAX,
    });
    // A self-extracting build unpacks its runtime here instead of the user's cache.
    Deno.env.set("SECTORLOG_CACHE_DIR", join(buildDir, "cache"));
    return binary;
  })();
  return built;
}

globalThis.addEventListener("unload", () => {
  if (buildDir !== undefined) Deno.removeSync(buildDir, { recursive: true });
});

/** One way of running the CLI: the command and the arguments before the subcommand's. */
interface Runner {
  name: string;
  command(): Promise<[string, string[]]>;
}

const RUNNERS: Runner[] = [
  { name: "deno run", command: () => Promise.resolve([Deno.execPath(), ["run", "-A", CLI_MAIN]]) },
  { name: "binary", command: async () => [await builtBinary(), []] },
];

async function sectorlog(runner: Runner, args: string[]): Promise<CommandResult> {
  const [command, prefix] = await runner.command();
  return await run(command, [...prefix, ...args]);
}

async function sectorlogOk(runner: Runner, args: string[]): Promise<CommandResult> {
  const result = await sectorlog(runner, args);
  assert.equal(result.code, 0, `${args.join(" ")}: exit ${result.code}\n${result.stderr}`);
  return result;
}

/** Tools the binary's launcher uses when it is a self-extracting build. */
const LAUNCHER_TOOLS = ["sh", "tail", "head", "gzip", "sha256sum"];

function test(name: string, tools: string[], fn: (runner: Runner) => Promise<void>): void {
  for (const runner of RUNNERS) {
    const full = `${runner.name}: ${name}`;
    const needs = runner.name === "binary" ? [...tools, ...LAUNCHER_TOOLS] : tools;
    Deno.test({ name: full, ignore: skipReason(full, needs) !== undefined, fn: () => fn(runner) });
  }
}

test("--version prints the tool, format and protocol versions", [], async (runner) => {
  const version = await sectorlogOk(runner, ["--version"]);
  assert.match(
    version.stdout,
    /^sectorlog \d+\.\d+\.\d+ \(logdir format \d+, entry format \d+, ship protocol \d+\)\n$/,
  );
  const help = await sectorlogOk(runner, ["restore", "--help"]);
  assert.match(help.stdout, /^Usage: sectorlog restore /m);
  const completions = await sectorlogOk(runner, ["completions", "bash"]);
  assert.match(completions.stdout, /complete -F _sectorlog sectorlog/);
});

test("snapshot, mark and restore reproduce an image byte for byte", [], async (runner) => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeSparseImage(device, 4 * MiB);
    const file = await Deno.open(device, { write: true });
    try {
      await file.seek(MiB + 512, Deno.SeekMode.Start);
      await file.write(new Uint8Array(8192).fill(0x5a));
    } finally {
      file.close();
    }
    const snapshot = JSON.parse(
      (await sectorlogOk(runner, ["snapshot", device, logdir, "--json"]))
        .stdout,
    );
    assert.equal(snapshot.deviceBytes, 4 * MiB);
    await sectorlogOk(runner, ["mark", logdir, "first"]);
    const out = join(dir, "out.img");
    await sectorlogOk(runner, ["restore", logdir, out, "--at", "mark:first"]);
    assertFilesEqual(out, device, "restored image");
    await sectorlogOk(runner, ["verify", logdir]);
  });
});

test("exit codes: 2 for bad usage, 3 for a damaged base, 4 for a held lock", [
  "flock",
  "sleep",
], async (runner) => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeSparseImage(device, MiB);
    await sectorlogOk(runner, ["snapshot", device, logdir]);

    for (const args of [["frobnicate"], ["restore", logdir, join(dir, "o.img"), "--at", "nope"]]) {
      const usage = await sectorlog(runner, args);
      assert.equal(usage.code, 2, `${args.join(" ")}: ${usage.stderr}`);
      assert.match(usage.stderr, /^sectorlog: /);
    }

    const lockFile = join(logdir, "lock");
    const holder = new BackgroundProcess("flock", ["--no-fork", lockFile, "sleep", "60"]);
    try {
      await waitFor(async () => {
        if (holder.exited !== undefined) throw new Error(`flock exited: ${holder.output}`);
        return (await run("flock", ["-n", "-E", "75", lockFile, "true"])).code === 75;
      }, "flock to take the logdir lock");
      const busy = await sectorlog(runner, ["mark", logdir, "m"]);
      assert.equal(busy.code, 4, busy.stderr);
      assert.ok(busy.stderr.includes(logdir), busy.stderr);
    } finally {
      await holder.close();
    }

    const manifest = JSON.parse(await Deno.readTextFile(join(logdir, "manifest.json")));
    const base = join(logdir, manifest.base.file);
    const bytes = await Deno.readFile(base);
    bytes[4096] ^= 0xff;
    await Deno.writeFile(base, bytes);
    const damaged = await sectorlog(runner, ["verify", logdir]);
    assert.equal(damaged.code, 3, damaged.stderr);
    assert.ok(damaged.stderr.includes(base), damaged.stderr);
  });
});

test("watch serves NBD and stops cleanly on SIGTERM (exit 0)", [], async (runner) => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    const socket = join(dir, "nbd.sock");
    await makeSparseImage(device, 2 * MiB);
    await sectorlogOk(runner, ["snapshot", device, logdir]);
    const [command, prefix] = await runner.command();
    const watch = new BackgroundProcess(command, [
      ...prefix,
      "watch",
      device,
      logdir,
      "--socket",
      socket,
    ]);
    try {
      await waitFor(() => {
        if (watch.exited !== undefined) throw new Error(`watch exited: ${watch.output}`);
        return Promise.resolve(watch.output.includes("sectorlog watch: serving "));
      }, "watch to listen");
      const client = await RawNbdClient.connect(socket);
      try {
        await client.startHandshake();
        await client.go();
        const payload = new Uint8Array(4096).fill(0xc3);
        await client.sendRequest({ type: NBD_CMD_WRITE, handle: 1n, offset: 65536, payload });
        assert.equal((await client.mustReadReply()).error, 0);
        await client.sendRequest({ type: NBD_CMD_FLUSH, handle: 2n });
        assert.equal((await client.mustReadReply()).error, 0);
      } finally {
        client.close();
      }
      // The pid we signal is the program itself (the launcher execs), as systemd's main pid is.
      const status = await watch.stop("SIGTERM");
      assert.equal(status.code, 0, watch.output);
      assert.match(watch.output, /stopped cleanly/);
    } finally {
      await watch.close();
    }
    const out = join(dir, "out.img");
    await sectorlogOk(runner, ["restore", logdir, out]);
    assertFilesEqual(out, device, "restore of the latest state");
    const restored = await Deno.readFile(out);
    assert.equal(restored[65536], 0xc3);
  });
});

Deno.test("binary: is one executable file that runs from any directory", {
  ignore: skipReason("binary: runs from any directory", LAUNCHER_TOOLS) !== undefined,
}, async () => {
  const binary = await builtBinary();
  const info = await Deno.stat(binary);
  assert.ok(info.isFile && (info.mode! & 0o111) !== 0, "executable bit");
  await withTempDir(async (dir) => {
    const result = await run(binary, ["--version"], { cwd: dir });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, "");
  });
});

test(
  "s3:// commands load the AWS SDK and report an unreachable endpoint in one line",
  [],
  async (runner) => {
    await withTempDir(async (dir) => {
      const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = (listener.addr as Deno.NetAddr).port;
      listener.close(); // nothing listens there now
      const [command, prefix] = await runner.command();
      const result = await run(command, [
        ...prefix,
        "restore",
        "s3://backups/vm1",
        join(dir, "out.img"),
        "--s3-endpoint",
        `http://127.0.0.1:${port}`,
      ], { env: { AWS_ACCESS_KEY_ID: "id", AWS_SECRET_ACCESS_KEY: "secret" } });
      assert.equal(result.code, 1, result.stderr);
      // Not a missing permission of the binary (NotCapable): the store could not be reached.
      assert.match(result.stderr, /^sectorlog: Cannot open s3:\/\/backups: cannot reach /);
      assert.doesNotMatch(result.stderr, /NotCapable|--allow-/);
    });
  },
);
