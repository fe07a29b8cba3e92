#!/usr/bin/env bash
# Reproduce the in-process R=4 crash of test_ht_gpu, and check the missing-peer fix.
cd "$(dirname "$0")/.."
EPCOMM_SKIP="tests python bench" EPCOMM_DEADLINE_S=200 tools/gpu-check.sh > /dev/null 2>&1; tail -3 build-gpu/logs/summary.md 2>/dev/null || cat $OUT/summary.md
B=build-gpu/tests/gpu
which gdb addr2line
export EPCOMM_TEST_LOCAL=1 EPCOMM_TIMEOUT_MS=10000
sym() { # resolve "(+0xOFF)" frames of the test binary
  grep -o "$1(+0x[0-9a-f]*)" "$2" | sed 's/.*(+\(0x[0-9a-f]*\))/\1/' | while read -r off; do
    echo "  $off $(addr2line -f -C -p -e "$1" "$off")"; done
}
for i in 1 2 3; do
  timeout 120 $B/test_ht_gpu --ranks 4 --rounds 2 > $OUT/ht$i.log 2>&1; rc=$?
  echo "test_ht_gpu R=4 run $i: rc $rc; $(grep -c ': ok' $OUT/ht$i.log) ok lines"
  if [[ $rc -ne 0 ]]; then tail -30 $OUT/ht$i.log; sym $B/test_ht_gpu $OUT/ht$i.log; fi
done
for i in 1 2 3; do
  EPCOMM_HT_COMBINE_OVERLAP=8 EPCOMM_TEST_ONLY=missing_peer timeout 60 $B/test_ht_modes_gpu --ranks 4 > $OUT/modes$i.log 2>&1
  echo "ht_modes overlap missing_peer R=4 run $i: rc $?"; grep -E "FAIL|saw|\[rank" $OUT/modes$i.log | head -5
  EPCOMM_TEST_ONLY=missing_peer timeout 60 $B/test_ht_modes_gpu --ranks 4 > $OUT/modesp$i.log 2>&1
  echo "ht_modes missing_peer R=4 run $i: rc $?"; grep -E "FAIL|\[rank" $OUT/modesp$i.log | head -5
done
