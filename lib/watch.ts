/**
 * watch: the log-assisted disk behind an NBD server, plus the control socket that lets `mark`
 * reach the running writer. Stopping it finishes requests in flight, flushes and seals.
 *
 * @module
 */
import { ControlServer } from "./control.ts";
import { LogAssistedDisk } from "./disk.ts";
import { type NbdListenOptions, type NbdLogger, NbdServer } from "./nbd/server.ts";
import { removeStaleSocket } from "./stale_socket.ts";

/** Options of {@linkcode startWatch}. */
export interface WatchOptions {
  /** A unix socket path or a TCP address to serve NBD on. */
  listen: NbdListenOptions;
  /** The export name (default "", like qemu-nbd). */
  exportName?: string;
  /** Serve read-only: nothing is journaled. */
  readOnly?: boolean;
  /** Receives NBD server events. */
  logger?: NbdLogger;
  /** Seal segments at this size (tests use small ones). */
  segmentBytesMax?: number;
}

/** A running watch. */
export interface WatchService {
  disk: LogAssistedDisk;
  nbd: NbdServer;
  /** Stops accepting, finishes requests in flight, flushes, seals the live segment, unlocks. */
  stop(): Promise<void>;
}

/**
 * Opens the log-assisted disk (recovering after a crash) and serves it over NBD.
 *
 * @example
 * ```ts
 * import { startWatch } from "./watch.ts";
 * const watch = await startWatch("/dev/loop3", "/var/lib/sectorlog/vm1", {
 *   listen: { path: "/run/sectorlog/vm1.sock" },
 * });
 * await watch.stop();
 * ```
 */
export async function startWatch(
  devicePath: string,
  logdir: string,
  options: WatchOptions,
): Promise<WatchService> {
  const disk = await LogAssistedDisk.open(devicePath, logdir, {
    readOnly: options.readOnly,
    segmentBytesMax: options.segmentBytesMax,
  });
  let control: ControlServer | undefined;
  let nbd: NbdServer;
  try {
    if (!disk.readOnly) {
      control = await ControlServer.listen(logdir, {
        mark: async (name) => {
          const header = await disk.mark(name);
          return { seq: header.seq, timeUs: header.timeUs };
        },
        seal: async () => {
          return { nextSeq: await disk.writer!.rotate() };
        },
        status: () => ({ device: devicePath, nextSeq: disk.writer?.nextSeq, ...disk.stats }),
      });
    }
    if ("path" in options.listen) await removeStaleSocket(options.listen.path);
    nbd = new NbdServer({
      backend: disk,
      listen: options.listen,
      exportName: options.exportName ?? "",
      description: `sectorlog watch of ${devicePath}`,
      logger: options.logger,
    });
  } catch (error) {
    await control?.close();
    await disk.close();
    throw error;
  }
  let stopping: Promise<void> | undefined;
  return {
    disk,
    nbd,
    stop() {
      stopping ??= (async () => {
        await nbd.close();
        await control?.close();
        await disk.close({ seal: true });
      })();
      return stopping;
    },
  };
}
