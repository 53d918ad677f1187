// sus — optional OpenMP: a parallel loop over independent tasks that compiles and runs
// without OpenMP. Results never depend on the thread count: every task writes its own
// outputs, and the callers fix what each task computes independently of the schedule.
#pragma once

#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../error.hpp"

namespace sus {
namespace detail {

// Threads to use: `requested` if > 0, else OpenMP's default (omp_get_max_threads); always 1
// without OpenMP.
inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// While alive, the calling thread's OpenMP default team size is 1, so an Eigen product run by
// a task stays serial — always with the same blocking, and so the same bits. Without it Eigen
// would split a GEMM across threads (and block it differently) whenever the task runs outside
// a parallel region or in a team of one thread (1 thread or 1 task, OMP_THREAD_LIMIT,
// OMP_DYNAMIC, a call from inside the caller's own parallel region). The setting is per
// OpenMP task, so every task sets it. (A process that calls Eigen::setNbThreads itself
// overrides it, and with it the thread-count independence of the dense GEMMs.)
class SerialEigenScope {
 public:
#ifdef _OPENMP
  SerialEigenScope() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SerialEigenScope() { omp_set_num_threads(saved_); }
#else
  SerialEigenScope() {}  // user-provided: a scope object, not an unused variable
  ~SerialEigenScope() {}
#endif
  SerialEigenScope(const SerialEigenScope&) = delete;
  SerialEigenScope& operator=(const SerialEigenScope&) = delete;

#ifdef _OPENMP
 private:
  int saved_;
#endif
};

// Runs f(task, worker) for task in [0, n_tasks) on up to `threads` threads (dynamic schedule);
// worker in [0, threads) names the thread running the task (for per-thread scratch). An
// exception thrown by a task is rethrown after the loop; if several tasks throw, the lowest
// task's exception wins, so the error does not depend on the schedule either.
template <class F>
void parallel_for(index_t n_tasks, int threads, F&& f) {
#ifdef _OPENMP
  if (threads > 1 && n_tasks > 1) {
    std::exception_ptr error;
    index_t error_task = n_tasks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index_t t = 0; t < n_tasks; ++t) {
      try {
        const SerialEigenScope serial;
        f(t, omp_get_thread_num());
      } catch (...) {
#pragma omp critical(sus_parallel_for_error)
        if (t < error_task) {
          error_task = t;
          error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#else
  (void)threads;
#endif
  const SerialEigenScope serial;
  for (index_t t = 0; t < n_tasks; ++t) f(t, 0);
}

}  // namespace detail
}  // namespace sus
