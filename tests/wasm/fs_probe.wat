;; Host-function probe: calls one cell host function with pointer/length
;; arguments read from a small header the test writes into the data segment.
;; Exports run() -> i32 returning the host function's return value.
(module
  (import "cell" "host_fs_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "cell" "host_fs_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "cell" "host_fetch" (func $fetch (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; offset 0: i32 op (0 read, 1 write, 2 fetch); 4: a; 8: b; 12: c; 16: d
  ;; offset 1024..: path / url / data bytes placed by the test via a data segment
  (func (export "run") (result i32)
    (local $op i32)
    (local.set $op (i32.load (i32.const 0)))
    (if (result i32) (i32.eq (local.get $op) (i32.const 0))
      (then (call $read (i32.load (i32.const 4)) (i32.load (i32.const 8)) (i32.load (i32.const 12)) (i32.load (i32.const 16))))
      (else
        (if (result i32) (i32.eq (local.get $op) (i32.const 1))
          (then (call $write (i32.load (i32.const 4)) (i32.load (i32.const 8)) (i32.load (i32.const 12)) (i32.load (i32.const 16))))
          (else (call $fetch (i32.load (i32.const 4)) (i32.load (i32.const 8)) (i32.load (i32.const 12)) (i32.load (i32.const 16))))))))
  (data (i32.const 0) "__HEADER__")
  (data (i32.const 1024) "__PAYLOAD__"))
