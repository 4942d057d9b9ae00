/**
 * A harness for integration tests that drive the real CLI: `sectorlog watch` as a child process
 * behind a unix socket, other subcommands run to completion, external tools (qemu-io, nbdinfo,
 * fio, …) with their exit code and output captured, and checks for which tools are installed.
 *
 * Everything a helper starts is ended by the same helper or by a `close()` meant for `finally`,
 * so Deno's resource and op sanitizers pass even when a test fails halfway.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (deno runs from here, so deno.json and its imports apply). */
export const REPO_DIR: string = fileURLToPath(new URL("..", import.meta.url));
/** The CLI entry point. */
export const CLI_MAIN: string = join(REPO_DIR, "cli", "main.ts");
/** How long `watch` may take to start listening (deno start-up included). */
export const WATCH_START_MS_MAX = 60_000;
/** How long `watch` may take to stop after SIGTERM. */
export const WATCH_STOP_MS_MAX = 60_000;
/** How long one command run by {@linkcode run} may take unless told otherwise. */
export const COMMAND_MS_MAX = 300_000;

/** What a finished command produced. */
export interface CommandResult {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
}

/** Options of {@linkcode run}. */
export interface RunOptions {
  /** Kill the command (SIGKILL) after this long and throw. Default {@linkcode COMMAND_MS_MAX}. */
  timeoutMs?: number;
  /** Bytes for stdin (default: no stdin). */
  stdin?: Uint8Array;
  cwd?: string;
  /** Extra environment variables for the command. */
  env?: Record<string, string>;
}

/** Runs `command` with `args` to completion and captures its exit code, stdout and stderr. */
export async function run(
  command: string,
  args: string[],
  options: RunOptions = {},
): Promise<CommandResult> {
  const child = new Deno.Command(command, {
    args,
    cwd: options.cwd ?? REPO_DIR,
    env: options.env,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already exited */ }
  }, options.timeoutMs ?? COMMAND_MS_MAX);
  try {
    if (options.stdin !== undefined) {
      const writer = child.stdin.getWriter();
      try {
        await writer.write(options.stdin);
      } finally {
        await writer.close().catch(() => {});
      }
    }
    const output = await child.output();
    const result = {
      code: output.code,
      signal: output.signal,
      stdout: new TextDecoder().decode(output.stdout),
      stderr: new TextDecoder().decode(output.stderr),
    };
    if (timedOut) {
      throw new Error(
        `${command} ${args.join(" ")} took longer than ${options.timeoutMs ?? COMMAND_MS_MAX} ms` +
          `; stderr: ${result.stderr}`,
      );
    }
    return result;
  } finally {
    clearTimeout(timer);
  }
}

/** Like {@linkcode run}, but throws (with stdout and stderr) unless the command exits 0. */
export async function runOk(
  command: string,
  args: string[],
  options: RunOptions = {},
): Promise<CommandResult> {
  const result = await run(command, args, options);
  if (result.code !== 0) {
    throw new Error(
      `${command} ${
        args.join(" ")
      } exited ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`,
    );
  }
  return result;
}

/**
 * The command line that runs `sectorlog`: `deno run -A cli/main.ts`, or the executable named by
 * SECTORLOG_BIN (e.g. `SECTORLOG_BIN=dist/sectorlog deno test -A tests/cli_test.ts` runs the
 * black-box tests against the built binary).
 */
export function cliCommand(args: string[]): [string, string[]] {
  const binary = Deno.env.get("SECTORLOG_BIN");
  if (binary !== undefined && binary !== "") return [binary, args];
  return [Deno.execPath(), ["run", "-A", CLI_MAIN, ...args]];
}

/** Runs `sectorlog <args>` (see {@linkcode cliCommand}). */
export function runCli(args: string[], options: RunOptions = {}): Promise<CommandResult> {
  return run(...cliCommand(args), options);
}

/** Like {@linkcode runCli}, but throws unless the CLI exits 0. */
export function runCliOk(args: string[], options: RunOptions = {}): Promise<CommandResult> {
  return runOk(...cliCommand(args), options);
}

/** Runs `sectorlog <args> --json` to success and parses its stdout. */
export async function runCliJson<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const result = await runCliOk([...args, "--json"]);
  return JSON.parse(result.stdout) as T;
}

/** The entry count that `sectorlog log --summary --json` reports for `logdir`. */
export async function entryCount(logdir: string): Promise<number> {
  const log = await runCliJson<{ entryCount: number }>(["log", logdir, "--summary"]);
  return log.entryCount;
}

/** The full path of `tool` on PATH, or undefined when it is not installed. */
export function which(tool: string): string | undefined {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir === "") continue;
    const path = join(dir, tool);
    try {
      const stat = fs.statSync(path);
      if (stat.isFile() && (stat.mode & 0o111) !== 0) return path;
    } catch {
      // Not in this directory.
    }
  }
  return undefined;
}

/** True when the tests run as root. */
export function isRoot(): boolean {
  return Deno.uid() === 0;
}

/**
 * Why a test cannot run here (a missing tool, or not root), printed once; undefined when it can.
 * Use as `Deno.test({ name, ignore: skipReason(name, [...]) !== undefined, fn })`.
 */
export function skipReason(
  testName: string,
  tools: string[],
  options: { root?: boolean; devices?: string[] } = {},
): string | undefined {
  const missing = tools.filter((tool) => which(tool) === undefined);
  const reasons: string[] = [];
  if (missing.length > 0) reasons.push(`missing ${missing.join(", ")} on PATH`);
  if (options.root === true && !isRoot()) reasons.push("needs root");
  for (const device of options.devices ?? []) {
    if (!fs.existsSync(device)) reasons.push(`no ${device}`);
  }
  if (reasons.length === 0) return undefined;
  const reason = reasons.join("; ");
  console.log(`skipping "${testName}": ${reason}`);
  return reason;
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A file of `sizeBytes` zeroes with no data blocks (sparse). */
export async function makeSparseImage(path: string, sizeBytes: number): Promise<void> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    await file.truncate(sizeBytes);
  } finally {
    file.close();
  }
}

/**
 * Compares two files chunk by chunk; throws naming the first differing offset (or the sizes).
 * Streams, so 64 MiB images cost only a couple of 1 MiB buffers.
 */
export function assertFilesEqual(actualPath: string, expectedPath: string, what: string): void {
  const chunkBytes = 1024 * 1024;
  const actualFd = fs.openSync(actualPath, "r");
  try {
    const expectedFd = fs.openSync(expectedPath, "r");
    try {
      const actualSize = fs.fstatSync(actualFd).size;
      const expectedSize = fs.fstatSync(expectedFd).size;
      if (actualSize !== expectedSize) {
        throw new Error(
          `${what}: ${actualPath} is ${actualSize} bytes, ${expectedPath} is ${expectedSize}`,
        );
      }
      const a = new Uint8Array(chunkBytes);
      const b = new Uint8Array(chunkBytes);
      for (let offset = 0; offset < actualSize; offset += chunkBytes) {
        const length = Math.min(chunkBytes, actualSize - offset);
        readFully(actualFd, a, length, offset);
        readFully(expectedFd, b, length, offset);
        for (let i = 0; i < length; i++) {
          if (a[i] !== b[i]) {
            throw new Error(
              `${what}: ${actualPath} and ${expectedPath} first differ at offset ${offset + i} (0x${
                a[i].toString(16)
              } vs 0x${b[i].toString(16)})`,
            );
          }
        }
      }
    } finally {
      fs.closeSync(expectedFd);
    }
  } finally {
    fs.closeSync(actualFd);
  }
}

function readFully(fd: number, buffer: Uint8Array, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buffer, done, length - done, position + done);
    if (n === 0) throw new Error(`Unexpected end of file at ${position + done}`);
    done += n;
  }
}

/** The NBD URI of a unix socket, as qemu, libnbd and fio spell it. */
export function nbdUri(socketPath: string): string {
  return `nbd+unix:///?socket=${socketPath}`;
}

/** Options of {@linkcode WatchProcess.start}. */
export interface WatchStartOptions {
  /** The unix socket to serve on. */
  socketPath: string;
  /** More arguments for `watch` (`--read-only`, `--verbose`). */
  args?: string[];
}

/**
 * `sectorlog watch <device> <logdir> --socket <path>` as a child process. Its stderr is collected
 * as it arrives; {@linkcode WatchProcess.stop} sends SIGTERM and requires exit code 0;
 * {@linkcode WatchProcess.close} (for `finally`) kills it if it still runs.
 */
export class WatchProcess {
  readonly device: string;
  readonly logdir: string;
  readonly socketPath: string;
  readonly child: Deno.ChildProcess;
  #stderrText = "";
  #stderrDone: Promise<void>;
  #status: Promise<Deno.CommandStatus>;
  #exited: Deno.CommandStatus | undefined;

  private constructor(device: string, logdir: string, socketPath: string, args: string[]) {
    this.device = device;
    this.logdir = logdir;
    this.socketPath = socketPath;
    const [command, commandArgs] = cliCommand([
      "watch",
      device,
      logdir,
      "--socket",
      socketPath,
      ...args,
    ]);
    this.child = new Deno.Command(command, {
      args: commandArgs,
      cwd: REPO_DIR,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#stderrDone = this.#collectStderr();
    this.#status = this.child.status.then((status) => this.#exited = status);
  }

  /**
   * Starts watch and resolves once it has said it is serving and its socket accepts connections
   * (throws if it exits first).
   */
  static async start(
    device: string,
    logdir: string,
    options: WatchStartOptions,
  ): Promise<WatchProcess> {
    const watch = new WatchProcess(device, logdir, options.socketPath, options.args ?? []);
    try {
      await watch.#waitUntilListening();
      return watch;
    } catch (error) {
      await watch.close();
      throw error;
    }
  }

  /** The process id (what the logdir lock file names). */
  get pid(): number {
    return this.child.pid;
  }

  /** The NBD URI of the socket. */
  get uri(): string {
    return nbdUri(this.socketPath);
  }

  /** Everything watch printed on stderr so far. */
  get stderr(): string {
    return this.#stderrText;
  }

  /** The exit status once it has exited. */
  get exited(): Deno.CommandStatus | undefined {
    return this.#exited;
  }

  async #collectStderr(): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of this.child.stderr) {
      this.#stderrText += decoder.decode(chunk, { stream: true });
    }
    this.#stderrText += decoder.decode();
  }

  async #waitUntilListening(): Promise<void> {
    const deadline = Date.now() + WATCH_START_MS_MAX;
    while (Date.now() < deadline) {
      if (this.#exited !== undefined) {
        await this.#stderrDone;
        throw new Error(
          `watch exited with code ${this.#exited.code} before listening; stderr:\n${this.#stderrText}`,
        );
      }
      // watch prints its recovery report and then "serving …" after it starts listening: wait
      // for both, so tests can read the report as soon as start() resolves.
      if (/sectorlog watch: serving /.test(this.#stderrText)) {
        try {
          const conn = await Deno.connect({ transport: "unix", path: this.socketPath });
          conn.close();
          return;
        } catch {
          // Not yet accepting.
        }
      }
      await sleep(50);
    }
    throw new Error(`watch did not listen on ${this.socketPath}; stderr:\n${this.#stderrText}`);
  }

  /** Sends SIGTERM, waits for exit and throws unless it exited 0. Returns its whole stderr. */
  async stop(): Promise<string> {
    if (this.#exited === undefined) {
      try {
        this.child.kill("SIGTERM");
      } catch { /* exited meanwhile */ }
    }
    const status = await this.#waitForExit(WATCH_STOP_MS_MAX);
    await this.#stderrDone;
    if (status === undefined) {
      this.child.kill("SIGKILL");
      await this.#status;
      throw new Error(`watch did not stop on SIGTERM; stderr:\n${this.#stderrText}`);
    }
    if (status.code !== 0) {
      throw new Error(
        `watch exited with code ${status.code} on SIGTERM; stderr:\n${this.#stderrText}`,
      );
    }
    return this.#stderrText;
  }

  /** kill -9: no clean shutdown, no flush, no seal. */
  async kill(): Promise<void> {
    if (this.#exited === undefined) {
      try {
        this.child.kill("SIGKILL");
      } catch { /* exited meanwhile */ }
    }
    await this.#status;
    await this.#stderrDone;
  }

  /** For `finally`: kills watch if it still runs and waits for it; never throws. */
  async close(): Promise<void> {
    try {
      await this.kill();
    } catch {
      // Nothing more to clean up.
    }
  }

  async #waitForExit(ms: number): Promise<Deno.CommandStatus | undefined> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), ms);
    });
    try {
      return await Promise.race([this.#status, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** A temp dir for one test, removed afterwards (after `body`'s own cleanup). */
export async function withTempDir<T>(body: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "sectorlog-watch-" });
  try {
    return await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A snapshot of `device` in a new `logdir`, through the CLI. */
export async function snapshot(device: string, logdir: string): Promise<void> {
  await runCliOk(["snapshot", device, logdir]);
}

/** Wall-clock time as ISO 8601 (ms precision): what tests record between phases. */
export function isoNow(): string {
  return new Date().toISOString();
}

/**
 * Waits a little, records the wall-clock time, and waits a little again: a time recorded between
 * two phases of writes, clearly after the first and before the second whatever the clock's
 * resolution and process start-up jitter.
 */
export async function timeBetweenPhases(gapMs = 150): Promise<string> {
  await sleep(gapMs);
  const time = isoNow();
  await sleep(gapMs);
  return time;
}

/** What a device should hold, built by a test alongside the writes it sends. */
export class ModelImage {
  readonly bytes: Uint8Array;
  constructor(sizeBytes: number) {
    this.bytes = new Uint8Array(sizeBytes);
  }
  /** `qemu-io -c 'write -P <value> <offset> <length>'`. */
  fill(value: number, offsetBytes: number, lengthBytes: number): void {
    this.bytes.fill(value, offsetBytes, offsetBytes + lengthBytes);
  }
  /** Copies `data` in at `offsetBytes`. */
  set(data: Uint8Array, offsetBytes: number): void {
    this.bytes.set(data, offsetBytes);
  }
  /** Writes the model to `path` as a raw image. */
  async save(path: string): Promise<void> {
    await Deno.writeFile(path, this.bytes);
  }
}

/** Runs `qemu-io -f raw <target> -c <command>…` and throws unless it exits 0. */
export async function qemuIo(
  target: string,
  commands: string[],
  options: { readOnly?: boolean; discard?: boolean } = {},
): Promise<CommandResult> {
  const args = ["-f", "raw"];
  if (options.readOnly === true) args.push("-r");
  if (options.discard === true) args.push("-d", "unmap");
  args.push(target);
  for (const command of commands) args.push("-c", command);
  const result = await runOk("qemu-io", args);
  // qemu-io exits 0 on some failed commands in older versions; its messages say so.
  if (/fail|error|Pattern verification/i.test(result.stdout + result.stderr)) {
    throw new Error(
      `qemu-io ${args.join(" ")} reported a failure:\n${result.stdout}${result.stderr}`,
    );
  }
  return result;
}

/** `qemu-img compare -f raw -F raw`: throws with qemu-img's explanation unless identical. */
export async function qemuImgCompare(actual: string, expected: string, what: string) {
  const result = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", actual, expected]);
  if (result.code !== 0) {
    throw new Error(
      `${what}: qemu-img compare ${actual} ${expected} exited ${result.code}: ${result.stdout}${result.stderr}`,
    );
  }
}

/**
 * A helper process running in the background (nbdfuse, fio) with its stderr collected.
 * {@linkcode BackgroundProcess.close} (for `finally`) kills it if it still runs and waits.
 */
export class BackgroundProcess {
  readonly command: string;
  readonly child: Deno.ChildProcess;
  #output = "";
  #outputDone: Promise<void>;
  #status: Promise<Deno.CommandStatus>;
  #exited: Deno.CommandStatus | undefined;

  constructor(command: string, args: string[], options: { env?: Record<string, string> } = {}) {
    this.command = command;
    this.child = new Deno.Command(command, {
      args,
      env: options.env,
      cwd: REPO_DIR,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#outputDone = Promise.all([
      this.#collect(this.child.stdout),
      this.#collect(this.child.stderr),
    ]).then(() => {});
    this.#status = this.child.status.then((status) => this.#exited = status);
  }

  async #collect(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of stream) this.#output += decoder.decode(chunk, { stream: true });
    this.#output += decoder.decode();
  }

  /** Its stdout and stderr so far, interleaved as they arrived. */
  get output(): string {
    return this.#output;
  }

  /** The exit status once it has exited. */
  get exited(): Deno.CommandStatus | undefined {
    return this.#exited;
  }

  /** Waits for it to exit by itself; returns its status. */
  async wait(): Promise<Deno.CommandStatus> {
    const status = await this.#status;
    await this.#outputDone;
    return status;
  }

  /** Sends `signal` (if still running) and waits for it to exit. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<Deno.CommandStatus> {
    if (this.#exited === undefined) {
      try {
        this.child.kill(signal);
      } catch { /* exited meanwhile */ }
    }
    return await this.wait();
  }

  /** For `finally`: SIGKILL if it still runs, then wait; never throws. */
  async close(): Promise<void> {
    try {
      await this.stop("SIGKILL");
    } catch {
      // Nothing more to clean up.
    }
  }
}

/** Polls `condition` every 50 ms until it holds; throws `what` after `timeoutMs`. */
export async function waitFor(
  condition: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 30_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await sleep(50);
  }
}

/**
 * Undo steps for resources a test sets up in order (watch, nbdfuse, a loop device, a mount):
 * each step registers its undo once it succeeded; the happy path runs undos explicitly with
 * {@linkcode Teardown.run}, and `finally` runs what is left with {@linkcode Teardown.runAll}, in
 * reverse order, each step even when an earlier one failed.
 */
export class Teardown {
  #steps: { name: string; undo: () => Promise<unknown> }[] = [];

  /** Registers `undo` for the resource `name` just set up. */
  add(name: string, undo: () => Promise<unknown>): void {
    this.#steps.push({ name, undo });
  }

  /** Runs and forgets the undo of `name` now (throws if it fails). */
  async run(name: string): Promise<void> {
    const index = this.#steps.findLastIndex((step) => step.name === name);
    if (index < 0) throw new Error(`Teardown has no step ${name}`);
    const [step] = this.#steps.splice(index, 1);
    await step.undo();
  }

  /** Runs every remaining undo, last registered first; throws the failures together at the end. */
  async runAll(): Promise<void> {
    const failures: string[] = [];
    while (this.#steps.length > 0) {
      const step = this.#steps.pop()!;
      try {
        await step.undo();
      } catch (error) {
        failures.push(`${step.name}: ${(error as Error).message}`);
        // Printed too: a failure in `finally` would otherwise hide the test's own error.
        console.error(`cleanup of ${step.name} failed: ${(error as Error).message}`);
      }
    }
    if (failures.length > 0) throw new Error(`Cleanup failed: ${failures.join("; ")}`);
  }
}
