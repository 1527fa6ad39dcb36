;; 10,000 tiny host calls (denied reads of an empty path): must finish and stay bounded.
(module
  (import "cell" "host_fs_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $i i32)
    (loop $l
      (drop (call $read (i32.const 100) (i32.const 0) (i32.const 200) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 10000))))
    (local.get $i)))
