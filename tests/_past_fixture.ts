/**
 * A logdir with a known history for the serve, diff and in-place restore tests: a base with some
 * data, then phases of random writes, zeroes and trims journaled through the log-assisted disk
 * with a fake clock, a model image after every phase, and the exact ranges each phase wrote.
 *
 * @module
 */
import { compactLogdir } from "../lib/compact.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { FakeClock, makeImage, type Random } from "./_helpers.ts";
import { BackgroundProcess, CLI_MAIN, nbdUri, waitFor } from "./_watch_harness.ts";

/** One phase of the history: the state after it, and what it wrote. */
export interface Phase {
  /** A time after the phase's last entry and before the next phase's first. */
  timeUs: number;
  /** The device after the phase. */
  image: Uint8Array;
  /** Ranges the phase wrote, zeroed or trimmed, in the order it did. */
  written: { offsetBytes: number; lengthBytes: number }[];
}

/** What {@linkcode buildHistory} made. */
export interface History {
  devicePath: string;
  logdir: string;
  clock: FakeClock;
  /** phases[0] is the state when the snapshot was taken (nothing written). */
  phases: Phase[];
}

/** Options of {@linkcode buildHistory}. */
export interface HistoryOptions {
  deviceBytes: number;
  phases: number;
  opsPerPhase: number;
  /** Largest single write (default 3 MiB, so writes cross extent buckets). */
  writeBytesMax?: number;
  /** Seal segments at this size, for many segments (default 1 MiB). */
  segmentBytesMax?: number;
  /** Compact up to the time of this phase afterwards (a level, and a later horizon). */
  compactThroughPhase?: number;
  /** Align every range to this many bytes (default 1: any offset). */
  alignBytes?: number;
}

/** Builds `dir/disk.img` and `dir/log` with a random history of `options.phases` phases. */
export async function buildHistory(
  dir: string,
  random: Random,
  options: HistoryOptions,
): Promise<History> {
  const devicePath = `${dir}/disk.img`;
  const logdir = `${dir}/log`;
  const deviceBytes = options.deviceBytes;
  const align = options.alignBytes ?? 1;
  const model = await makeImage(devicePath, deviceBytes, (bytes) => {
    random.fill(bytes.subarray(0, Math.floor(deviceBytes / 4)));
  });
  const clock = new FakeClock();
  await takeSnapshot(devicePath, logdir, { clock: clock.fn });
  clock.advance(1000);
  const phases: Phase[] = [{ timeUs: clock.nowUs, image: model.slice(), written: [] }];
  const disk = await LogAssistedDisk.open(devicePath, logdir, {
    clock: clock.fn,
    segmentBytesMax: options.segmentBytesMax ?? 1024 * 1024,
  });
  try {
    for (let phase = 1; phase <= options.phases; phase++) {
      clock.advance(1000);
      const written: Phase["written"] = [];
      for (let op = 0; op < options.opsPerPhase; op++) {
        const lengthMax = Math.min(options.writeBytesMax ?? 3 * 1024 * 1024, deviceBytes);
        const length = Math.max(align, Math.floor(random.int(1, lengthMax) / align) * align);
        const offset = Math.floor(random.int(0, deviceBytes - length) / align) * align;
        const kind = random.int(0, 9);
        if (kind < 7) {
          const data = new Uint8Array(length);
          random.fill(data);
          await disk.write(offset, data);
          model.set(data, offset);
        } else if (kind < 9) {
          await disk.zero(offset, length);
          model.fill(0, offset, offset + length);
        } else {
          await disk.trim(offset, length);
          model.fill(0, offset, offset + length);
        }
        written.push({ offsetBytes: offset, lengthBytes: length });
        if (random.int(0, 3) === 0) clock.advance(random.int(0, 50));
      }
      await disk.flush();
      clock.advance(1000);
      phases.push({ timeUs: clock.nowUs, image: model.slice(), written });
      clock.advance(1000);
    }
  } finally {
    await disk.close();
  }
  if (options.compactThroughPhase !== undefined) {
    await compactLogdir(logdir, {
      cutUs: phases[options.compactThroughPhase].timeUs,
      nowUs: clock.nowUs,
    });
  }
  return { devicePath, logdir, clock, phases };
}

/** A TIME argument for the CLI that names `timeUs` exactly: `@<seconds>.<µs>`. */
export function timeArg(timeUs: number): string {
  return `@${Math.floor(timeUs / 1e6)}.${String(timeUs % 1e6).padStart(6, "0")}`;
}

/**
 * `sectorlog serve <logdir> --socket <path> <args>` as a child process, started once it says it
 * serves and its socket accepts connections. {@linkcode ServeProcess.stop} sends SIGTERM and
 * requires exit 0; {@linkcode ServeProcess.close} (for `finally`) kills it if it still runs.
 */
export class ServeProcess {
  readonly socketPath: string;
  readonly process: BackgroundProcess;

  private constructor(
    logdir: string,
    socketPath: string,
    args: string[],
    env: Record<string, string> | undefined,
  ) {
    this.socketPath = socketPath;
    this.process = new BackgroundProcess(Deno.execPath(), [
      "run",
      "-A",
      CLI_MAIN,
      "serve",
      logdir,
      "--socket",
      socketPath,
      ...args,
    ], { env });
  }

  /**
   * Starts serve (with `env` added to the environment) and waits until it listens (throws with
   * its output if it exits first).
   */
  static async start(
    logdir: string,
    socketPath: string,
    args: string[],
    env?: Record<string, string>,
  ): Promise<ServeProcess> {
    const serve = new ServeProcess(logdir, socketPath, args, env);
    try {
      await waitFor(
        async () => {
          if (serve.process.exited !== undefined) {
            await serve.process.wait();
            throw new Error(
              `serve exited ${serve.process.exited.code} before listening: ${serve.process.output}`,
            );
          }
          if (!/sectorlog serve: serving /.test(serve.process.output)) return false;
          try {
            (await Deno.connect({ transport: "unix", path: socketPath })).close();
            return true;
          } catch {
            return false;
          }
        },
        `serve to listen on ${socketPath}`,
        60_000,
      );
      return serve;
    } catch (error) {
      await serve.close();
      throw error;
    }
  }

  /** The NBD URI of the socket. */
  get uri(): string {
    return nbdUri(this.socketPath);
  }

  /** SIGTERM; throws unless it exits 0. Returns its output. */
  async stop(): Promise<string> {
    const status = await this.process.stop("SIGTERM");
    if (status.code !== 0) {
      throw new Error(`serve exited ${status.code} on SIGTERM: ${this.process.output}`);
    }
    return this.process.output;
  }

  /** For `finally`: kills it if it still runs. */
  async close(): Promise<void> {
    await this.process.close();
  }
}
