/*
 * threads N -- a small pthread program for the IDS's process tests.
 *
 * Starts N threads that sleep, forks one child that exits at once and is
 * never reaped (so it stays a zombie while this runs), prints
 * "PID ZOMBIE_PID" and sleeps until killed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *sleeper(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: threads N\n");
        return 2;
    }
    int n = atoi(argv[1]);
    if (n < 0 || n > 256) {
        fprintf(stderr, "threads: N must be 0..256\n");
        return 2;
    }
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, sleeper, NULL) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0)
        _exit(0);
    printf("%d %d\n", (int)getpid(), (int)child);
    fflush(stdout);
    for (;;)
        pause();
}
