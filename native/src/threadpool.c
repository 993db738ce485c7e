/* A small persistent thread pool that splits one kernel call into parts.
 * The caller takes parts too, so a call never waits for an idle worker to
 * wake before work starts, and kernel_threads = 1 uses no pool at all.
 * Parts are coarse (one per thread), so a mutex guards all the state. */
#include "et_internal.h"

#include <stdlib.h>

typedef struct et_job {
    void (*fn)(void *, int, int);
    void *arg;
    int parts;
    int next;       /* next part to hand out */
    int remaining;  /* parts not yet finished */
    struct et_job *link;
} et_job;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static et_job *pool_queue;
static int pool_workers;      /* threads started besides callers */
static int kernel_threads = 1;

static void unlink_job(et_job *job) {
    for (et_job **p = &pool_queue; *p; p = &(*p)->link)
        if (*p == job) {
            *p = job->link;
            return;
        }
}

/* Takes the next part of job under pool_mu, runs it unlocked. */
static void run_one(et_job *job) {
    int part = job->next++;
    if (job->next >= job->parts) unlink_job(job);
    pthread_mutex_unlock(&pool_mu);
    job->fn(job->arg, part, job->parts);
    pthread_mutex_lock(&pool_mu);
    if (--job->remaining == 0) pthread_cond_broadcast(&pool_done);
}

static void *worker_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (!pool_queue) pthread_cond_wait(&pool_work, &pool_mu);
        run_one(pool_queue);
    }
    return NULL;
}

void et_pool_run(void (*fn)(void *, int, int), void *arg, int parts) {
    if (parts <= 1) {
        fn(arg, 0, 1);
        return;
    }
    et_job job = {fn, arg, parts, 0, parts, NULL};
    pthread_mutex_lock(&pool_mu);
    job.link = pool_queue;
    pool_queue = &job;
    pthread_cond_broadcast(&pool_work);
    while (job.next < job.parts) run_one(&job);
    while (job.remaining > 0) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
}

int et_set_kernel_threads(int32_t n) {
    if (n < 1 || n > 256) return ET_E_ARG;
    pthread_mutex_lock(&pool_mu);
    int rc = ET_OK;
    while (pool_workers < n - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (err) {
            rc = ET_E_NOMEM;
            break;
        }
        pool_workers++;
    }
    kernel_threads = rc == ET_OK ? n : pool_workers + 1;
    pthread_mutex_unlock(&pool_mu);
    return rc;
}

int32_t et_kernel_threads(void) {
    pthread_mutex_lock(&pool_mu);
    int n = kernel_threads;
    pthread_mutex_unlock(&pool_mu);
    return n;
}
