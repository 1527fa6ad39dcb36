;; Grows memory one 64 KiB page at a time until refused; returns pages reached.
(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n)))
