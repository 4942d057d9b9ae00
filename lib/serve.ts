/**
 * serve: a read-only NBD export of the device as it was at a point in time, a
 * {@linkcode PastView} behind an {@linkcode NbdServer}; with an overlay directory, a writable one
 * whose writes go to a throwaway {@linkcode OverlayBackend}. It takes no lock: it only reads the
 * logdir's files, so `watch`, `receive` and `compact` go on meanwhile.
 *
 * @module
 */
import { type NbdListenOptions, type NbdLogger, NbdServer } from "./nbd/server.ts";
import { OverlayBackend } from "./overlay.ts";
import { PastView, type PastViewOptions } from "./past_view.ts";
import { removeStaleSocket } from "./stale_socket.ts";
import { formatTimeUtc } from "./time.ts";

/** Options of {@linkcode startServe}. */
export interface ServeOptions extends PastViewOptions {
  /** A unix socket path or a TCP address to serve NBD on. */
  listen: NbdListenOptions;
  /** The export name (default "", like qemu-nbd). */
  exportName?: string;
  /** Receives NBD server events. */
  logger?: NbdLogger;
  /**
   * Accept writes into a throwaway overlay file in this directory (unlinked at once, gone when
   * serve stops) instead of refusing them; the logdir is never written.
   */
  overlayDir?: string;
}

/** A running serve. */
export interface ServeService {
  view: PastView;
  /** The writable overlay, with `overlayDir`. */
  overlay?: OverlayBackend;
  nbd: NbdServer;
  /** Stops accepting, finishes requests in flight, closes connections and the view's files. */
  stop(): Promise<void>;
}

/**
 * Opens a view of `logdir` at `options.at` and serves it read-only over NBD.
 *
 * @example
 * ```ts ignore
 * import { startServe } from "./serve.ts";
 * import { parseTime } from "./time.ts";
 * const serve = await startServe("/var/lib/sectorlog/vm1", {
 *   at: parseTime("2026-11-24 02:13"),
 *   listen: { path: "/run/sectorlog/vm1-0213.sock" },
 * });
 * // nbdfuse /mnt/past --unix /run/sectorlog/vm1-0213.sock
 * await serve.stop();
 * ```
 */
export async function startServe(logdir: string, options: ServeOptions): Promise<ServeService> {
  const view = await PastView.open(logdir, options);
  let overlay: OverlayBackend | undefined;
  let nbd: NbdServer;
  try {
    if (options.overlayDir !== undefined) overlay = OverlayBackend.create(view, options.overlayDir);
    if ("path" in options.listen) await removeStaleSocket(options.listen.path);
    nbd = new NbdServer({
      backend: overlay ?? view,
      listen: options.listen,
      exportName: options.exportName ?? "",
      description: `sectorlog serve of ${logdir} as of ${formatTimeUtc(view.info.targetUs)}${
        overlay === undefined ? "" : " (writable overlay, thrown away on stop)"
      }`,
      logger: options.logger,
    });
  } catch (error) {
    overlay?.close();
    view.close();
    throw error;
  }
  let stopping: Promise<void> | undefined;
  return {
    view,
    overlay,
    nbd,
    stop() {
      stopping ??= (async () => {
        try {
          await nbd.close();
        } finally {
          overlay?.close();
          view.close();
        }
      })();
      return stopping;
    },
  };
}
