/**
 * sectorlog: continuous point-in-time backup for block devices. A log-assisted disk journals
 * every sector write with its time; with a base snapshot and that journal, the device can be
 * rebuilt exactly as it was at any moment.
 *
 * ```ts
 * import { LogAssistedDisk, restoreAt, takeSnapshot } from "./mod.ts";
 * await takeSnapshot("disk.img", "./log");
 * const disk = await LogAssistedDisk.open("disk.img", "./log");
 * await disk.write(0, new Uint8Array(4096).fill(7));
 * await disk.flush();
 * await disk.close();
 * await restoreAt("./log", "restored.img");
 * ```
 *
 * @module
 */
export * from "./lib/address.ts";
export * from "./lib/compact.ts";
export * from "./lib/control.ts";
export * from "./lib/device.ts";
export * from "./lib/diff.ts";
export * from "./lib/disk.ts";
export * from "./lib/errors.ts";
export * from "./lib/format/entry.ts";
export * from "./lib/format/logdir.ts";
export * from "./lib/format/logdir_writer.ts";
export * from "./lib/format/manifest.ts";
export * from "./lib/format/segment.ts";
export * from "./lib/group_sync.ts";
export * from "./lib/mark.ts";
export * from "./lib/nbd/backend.ts";
export * from "./lib/nbd/constants.ts";
export * from "./lib/nbd/memory_backend.ts";
export * from "./lib/nbd/server.ts";
export * from "./lib/overlay.ts";
export * from "./lib/past_view.ts";
export * from "./lib/restore.ts";
export * from "./lib/restore_in_place.ts";
export * from "./lib/serve.ts";
export * from "./lib/ship/auth.ts";
export * from "./lib/ship/host_store.ts";
export * from "./lib/ship/log_tail.ts";
export * from "./lib/ship/receiver.ts";
export * from "./lib/ship/sender.ts";
export * from "./lib/ship/wire.ts";
export * from "./lib/snapshot.ts";
export * from "./lib/stale_socket.ts";
export * from "./lib/sparse_copy.ts";
export * from "./lib/store/object_store.ts";
export * from "./lib/store/receive_to_store.ts";
export * from "./lib/store/s3_store.ts";
export * from "./lib/store/store_logdir.ts";
export * from "./lib/store/store_copy.ts";
export * from "./lib/store/lease.ts";
export * from "./lib/store/store_gc.ts";
export * from "./lib/store/store_compact.ts";
export * from "./lib/store/store_restore.ts";
export * from "./lib/time.ts";
export * from "./lib/timeline.ts";
export * from "./lib/verify.ts";
export * from "./lib/watch.ts";
