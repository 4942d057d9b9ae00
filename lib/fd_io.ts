/**
 * Positional I/O on raw file descriptors, for the readers that still hold descriptors (the view
 * of the past that `serve` pages in with parallel preads, its overlay, shipping). Everything on
 * the write path goes through `storage/storage.ts` instead.
 *
 * @module
 */
import * as fs from "node:fs";

/** Reads exactly `length` bytes at `position`, looping over short reads. */
export function readFully(fd: number, target: Uint8Array, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, target, done, length - done, position + done);
    if (n === 0) throw new Error(`Unexpected end of file at offset ${position + done}`);
    done += n;
  }
}

/** Writes all of `source[0, length)` at `position`, looping over short writes. */
export function writeFully(fd: number, source: Uint8Array, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    done += fs.writeSync(fd, source, done, length - done, position + done);
  }
}

/** fdatasync on libuv's thread pool, so the event loop keeps serving while the disk works. */
export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.fdatasync(fd, (error) => error ? reject(error) : resolve());
  });
}
