/**
 * The command line as a black box (`deno run -A cli/main.ts …` in a child process): help and
 * version, DESIGN.md's exit codes (2 usage, 3 integrity, 4 busy) with messages that name what was
 * wrong, and `--json` summaries that parse.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import denoJson from "../deno.json" with { type: "json" };
import {
  BackgroundProcess,
  type CommandResult,
  makeSparseImage,
  run,
  runCli,
  runCliOk,
  skipReason,
  snapshot,
  waitFor,
  WatchProcess,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;
const KNOWN_SUBCOMMANDS = ["snapshot", "watch", "restore", "log", "verify", "mark"];

/** The subcommands `sectorlog --help` lists (without `help` itself). */
async function listedSubcommands(): Promise<string[]> {
  const help = await runCliOk(["--help"]);
  // The section runs from "Commands:" to the first blank line (the example follows it).
  const section = (help.stdout.split(/^Commands:$/m)[1] ?? "").split(/\n\s*\n/)[0];
  const names = [...section.matchAll(/^ {2}([a-z][a-z-]*)\b/gm)].map((m) => m[1]);
  return names.filter((name) => name !== "help");
}

/** Every stderr line is the error, a hint, or commander's pointer to --help. */
function assertUsageMessage(result: CommandResult, names: string, what: string): void {
  assert.equal(result.code, 2, `${what}: exit ${result.code}, stderr: ${result.stderr}`);
  assert.equal(result.stdout, "", `${what}: nothing on stdout`);
  const lines = result.stderr.trimEnd().split("\n");
  assert.match(lines[0], /^sectorlog: /, `${what}: ${result.stderr}`);
  assert.ok(lines[0].includes(names), `${what}: first line should name ${names}: ${lines[0]}`);
  for (const line of lines.slice(1)) {
    assert.match(line, /^(hint: |\(add --help)/, `${what}: unexpected stderr line ${line}`);
  }
}

Deno.test("every subcommand's --help exits 0 and shows an example", async () => {
  const subcommands = await listedSubcommands();
  for (const known of KNOWN_SUBCOMMANDS) {
    assert.ok(subcommands.includes(known), `--help does not list ${known}`);
  }
  const root = await runCli(["--help"]);
  assert.equal(root.code, 0);
  assert.match(root.stdout, /Example/);
  assert.match(root.stdout, /Exit codes/);
  const results = await Promise.all(subcommands.map((name) => runCli([name, "--help"])));
  for (const [i, result] of results.entries()) {
    const name = subcommands[i];
    assert.equal(result.code, 0, `${name} --help exited ${result.code}: ${result.stderr}`);
    assert.match(result.stdout, /Example/, `${name} --help has no example`);
    assert.match(result.stdout, new RegExp(`^Usage: sectorlog ${name} `, "m"));
  }
  const viaHelp = await runCli(["help", "restore"]);
  assert.equal(viaHelp.code, 0);
  assert.match(viaHelp.stdout, /--to-flush/);
});

Deno.test("--version prints the program, format and ship protocol versions", async () => {
  for (const flag of ["--version", "-V"]) {
    const result = await runCliOk([flag]);
    assert.match(
      result.stdout.trim(),
      new RegExp(
        `^sectorlog ${denoJson.version.replaceAll(".", "\\.")} ` +
          `\\(logdir format \\d+, entry format \\d+, ship protocol \\d+\\)$`,
      ),
    );
  }
});

Deno.test("usage errors exit 2 with a message naming the argument", async () => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeSparseImage(device, MiB);
    await snapshot(device, logdir);
    const out = join(dir, "out.img");
    const cases: [string[], string, string][] = [
      [["restore", logdir, out, "--bogus"], "--bogus", "unknown option"],
      [["restore", logdir, out, "--at", "yesterday"], "yesterday", "bad TIME"],
      [["restore", logdir, out, "--at", "seq:99"], "seq:99", "seq outside the window"],
      [["restore", logdir, out, "--at", "mark:nope"], "mark:nope", "unknown mark"],
      [["log", logdir, "--from", "tomorrow-ish"], "tomorrow-ish", "bad --from"],
      [["restore"], "logdir", "missing argument"],
      [["frobnicate"], "frobnicate", "unknown subcommand"],
      [["watch", device, logdir], "--socket", "watch without --socket or --listen"],
      [["watch", device, logdir, "--listen", "nowhere"], "nowhere", "bad --listen"],
      [["mark", logdir, ""], '""', "empty mark name"],
      [["snapshot", device, logdir], logdir, "snapshot over an existing logdir"],
    ];
    const results = await Promise.all(cases.map(([args]) => runCli(args)));
    for (const [i, result] of results.entries()) {
      const [, names, what] = cases[i];
      assertUsageMessage(result, names, what);
    }
    // Nothing was written by any of them.
    assert.equal(await Deno.stat(out).catch(() => undefined), undefined);
  });
});

/** A logdir holding a base and three marks (the marks' names are the payloads to corrupt). */
async function logdirWithMarks(dir: string): Promise<{ device: string; logdir: string }> {
  const device = join(dir, "disk.img");
  const logdir = join(dir, "log");
  await makeSparseImage(device, MiB);
  await snapshot(device, logdir);
  for (const name of ["first-mark", "second-mark", "third-mark"]) {
    await runCliOk(["mark", logdir, name]);
  }
  return { device, logdir };
}

/** Flips one byte at `offset` of `path`. */
async function flipByte(path: string, offset: number): Promise<void> {
  const bytes = await Deno.readFile(path);
  bytes[offset] ^= 0xff;
  await Deno.writeFile(path, bytes);
}

Deno.test("verify and restore exit 3 on a corrupted segment or base", async () => {
  await withTempDir(async (dir) => {
    const { logdir } = await logdirWithMarks(dir);
    assert.equal((await runCli(["verify", logdir])).code, 0);
    const segments = [...Deno.readDirSync(join(logdir, "segments"))].map((e) => e.name).sort();
    assert.ok(segments.length > 0);
    const segment = join(logdir, "segments", segments[0]);
    const bytes = await Deno.readFile(segment);
    const firstEntry = new TextDecoder("latin1").decode(bytes).indexOf("SLGE");
    assert.ok(firstEntry >= 0, "no entry magic in the segment");
    // The first mark's name, with two valid entries after it: corruption, not a torn tail.
    await flipByte(segment, firstEntry + 64 + 2);
    const verify = await runCli(["verify", logdir]);
    assert.equal(verify.code, 3, verify.stderr);
    assert.ok(verify.stderr.includes(segment), `verify should name ${segment}: ${verify.stderr}`);
    const json = await runCli(["verify", logdir, "--json"]);
    assert.equal(json.code, 3);
    const summary = JSON.parse(json.stdout);
    assert.equal(summary.ok, false);
    assert.ok(summary.problems.length > 0);
    const restore = await runCli(["restore", logdir, join(dir, "out.img")]);
    assert.equal(restore.code, 3, restore.stderr);
    await flipByte(segment, firstEntry + 64 + 2);
    assert.equal((await runCli(["verify", logdir])).code, 0, "flipping back repairs it");

    const manifest = JSON.parse(await Deno.readTextFile(join(logdir, "manifest.json")));
    const base = join(logdir, manifest.base.file);
    const baseBytes = await Deno.readFile(base);
    baseBytes[4096] = 0x42;
    await Deno.writeFile(base, baseBytes);
    const badBase = await runCli(["verify", logdir]);
    assert.equal(badBase.code, 3, badBase.stderr);
    assert.ok(badBase.stderr.includes(base), badBase.stderr);
    assert.equal((await runCli(["restore", logdir, join(dir, "out2.img")])).code, 3);
  });
});

Deno.test("a second watch on a logdir a running watch holds exits 4 naming its pid", async () => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeSparseImage(device, 4 * MiB);
    await snapshot(device, logdir);
    const watch = await WatchProcess.start(device, logdir, { socketPath: join(dir, "a.sock") });
    try {
      const busy = await runCli(["watch", device, logdir, "--socket", join(dir, "b.sock")]);
      assert.equal(busy.code, 4, busy.stderr);
      assert.match(busy.stderr, new RegExp(`pid ${watch.pid}\\b`));
      assert.ok(busy.stderr.includes(logdir), busy.stderr);
      // Readers are never refused, and mark and snapshot --force go through the running watch's
      // control socket instead of failing as busy.
      const mark = JSON.parse((await runCliOk(["mark", logdir, "while-busy", "--json"])).stdout);
      assert.equal(mark.via, "watch");
      assert.equal((await runCli(["verify", logdir])).code, 0);
      await runCliOk(["restore", logdir, join(dir, "out.img"), "--at", "mark:while-busy"]);
      await runCliOk(["snapshot", "--force", device, logdir]);
      await watch.stop();
    } finally {
      await watch.close();
    }
  });
});

const FLOCK =
  "snapshot --force and mark exit 4 naming the pid of a lock holder without control socket";
Deno.test({
  name: FLOCK,
  ignore: skipReason(FLOCK, ["flock", "sleep"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      await makeSparseImage(device, MiB);
      await snapshot(device, logdir);
      const lockFile = join(logdir, "lock");
      // Another writer that holds the flock but serves no control socket (a compact, a receive).
      const holder = new BackgroundProcess("flock", ["--no-fork", lockFile, "sleep", "300"]);
      try {
        await waitFor(async () => {
          if (holder.exited !== undefined) throw new Error(`flock exited: ${holder.output}`);
          return (await run("flock", ["-n", "-E", "75", lockFile, "true"])).code === 75;
        }, "flock to take the logdir lock");
        await Deno.writeTextFile(lockFile, `${holder.child.pid} test-holder\n`);
        for (const args of [["snapshot", "--force", device, logdir], ["mark", logdir, "m"]]) {
          const busy = await runCli(args);
          assert.equal(busy.code, 4, `${args[0]}: ${busy.stderr}`);
          assert.match(busy.stderr, new RegExp(`pid ${holder.child.pid}\\b.*test-holder`));
          assert.ok(busy.stderr.includes(logdir), busy.stderr);
        }
      } finally {
        await holder.close();
      }
      // Once the holder is gone, both succeed.
      await runCliOk(["mark", logdir, "m"]);
      await runCliOk(["snapshot", "--force", device, logdir]);
    }),
});

Deno.test("--json output of snapshot, mark, log, verify and restore parses", async () => {
  await withTempDir(async (dir) => {
    const device = join(dir, "disk.img");
    const logdir = join(dir, "log");
    await makeSparseImage(device, 2 * MiB);
    const parse = async (args: string[]) => {
      const result = await runCliOk([...args, "--json"]);
      try {
        return JSON.parse(result.stdout);
      } catch (error) {
        throw new Error(`${args[0]} --json is not JSON: ${result.stdout}`, { cause: error });
      }
    };
    const snap = await parse(["snapshot", device, logdir]);
    assert.equal(snap.command, "snapshot");
    assert.equal(snap.deviceBytes, 2 * MiB);
    const mark = await parse(["mark", logdir, "json-mark"]);
    assert.equal(mark.command, "mark");
    assert.equal(mark.name, "json-mark");
    assert.equal(mark.via, "logdir");
    assert.equal(typeof mark.seq, "number");
    const log = await parse(["log", logdir]);
    assert.equal(log.entryCount, 1);
    assert.equal(log.entries[0].kind, "mark");
    assert.equal(log.marks[0].name, "json-mark");
    const summary = await parse(["log", logdir, "--summary"]);
    assert.equal(summary.entries, undefined);
    const verify = await parse(["verify", logdir]);
    assert.equal(verify.command, "verify");
    assert.equal(verify.ok, true);
    const restore = await parse([
      "restore",
      logdir,
      join(dir, "out.img"),
      "--at",
      "mark:json-mark",
    ]);
    assert.equal(restore.command, "restore");
    assert.equal(restore.targetSeq, mark.seq);
    assert.equal(restore.deviceBytes, 2 * MiB);
  });
});
