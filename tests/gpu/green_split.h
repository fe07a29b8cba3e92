/* Splitting one GPU into green contexts (SM partitions), so that several ranks of an in-process group can share
 * it: each rank's kernels run on its own SMs, and a rank whose kernel waits for a peer cannot hold the SMs that
 * peer needs. Used by the C test harness (mp.c) and, as libepcomm_test_green.so, by the Python GPU tests. */
#ifndef EP_TEST_GREEN_SPLIT_H
#define EP_TEST_GREEN_SPLIT_H

#include <cuda.h>

/* Splits `device` into `parts` green contexts of equal size (as many SMs each as the partition alignment
 * allows) and stores a CUcontext for each in out[0..parts-1] (make one current with cuCtxSetCurrent). The
 * SMs of each go to *sms_each. Returns 0, or -1 when the device cannot be split that way. The contexts live
 * as long as the process. */
int ep_test_green_split(int device, int parts, CUcontext *out, unsigned *sms_each);

#endif
