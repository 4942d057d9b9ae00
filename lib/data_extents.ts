/**
 * Where a sparse file holds data: lseek(SEEK_DATA/SEEK_HOLE) through libc, so copies and
 * checksums skip holes without reading them. Deno has no SEEK_DATA, hence the small FFI binding;
 * without FFI permission (or on a filesystem that reports no holes) the whole file is data.
 *
 * @module
 */

/** A range of a file that holds data (holes between extents read as zeroes). */
export interface Extent {
  offsetBytes: number;
  lengthBytes: number;
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const O_RDONLY = 0;

const libcSymbols = {
  open: { parameters: ["buffer", "i32"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
} as const;

type Libc = Deno.DynamicLibrary<typeof libcSymbols>["symbols"];

let libc: Libc | null | undefined;

function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  try {
    libc = Deno.dlopen("libc.so.6", libcSymbols).symbols;
  } catch {
    libc = null; // No FFI permission or no glibc: callers fall back to reading everything.
  }
  return libc;
}

/**
 * Yields the data extents of the file at `path` in offset order, clipped to `sizeBytes`. Falls
 * back to one extent covering the whole file when holes cannot be found.
 *
 * @example
 * ```ts
 * import { dataExtents } from "./data_extents.ts";
 * for (const extent of dataExtents("base.img", 1 << 30)) console.log(extent);
 * ```
 */
export function* dataExtents(path: string, sizeBytes: number): Generator<Extent> {
  const symbols = loadLibc();
  const fd = symbols === null ? -1 : symbols.open(new TextEncoder().encode(path + "\0"), O_RDONLY);
  if (symbols === null || fd < 0) {
    if (sizeBytes > 0) yield { offsetBytes: 0, lengthBytes: sizeBytes };
    return;
  }
  try {
    let position = 0;
    while (position < sizeBytes) {
      const dataAt = Number(symbols.lseek(fd, BigInt(position), SEEK_DATA));
      if (dataAt < 0 || dataAt >= sizeBytes) return; // ENXIO: only a hole remains.
      const holeAt = Number(symbols.lseek(fd, BigInt(dataAt), SEEK_HOLE));
      const end = holeAt < 0 ? sizeBytes : Math.min(holeAt, sizeBytes);
      yield { offsetBytes: dataAt, lengthBytes: end - dataAt };
      position = end;
    }
  } finally {
    symbols.close(fd);
  }
}
