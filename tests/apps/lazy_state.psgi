# An app whose state is built lazily by its first request in each process,
# as a database handle or a fork-safe cache is (made again after a fork):
# each answer says in which process, at which of that process's requests,
# and with which APP_MODE that state was built.
use strict;
use warnings;
my $state;
my $requests = 0;
my $app = sub {
    # a process forked since: its state and its count are its own
    ($state, $requests) = (undef, 0) if $state && $state->{built_in} != $$;
    $requests++;
    $state //= { built_in => $$, built_at => $requests, mode => $ENV{APP_MODE} // '-' };
    return [200, ['Content-Type' => 'text/plain'],
            ["built_in=$state->{built_in} built_at=$state->{built_at} mode=$state->{mode}"
             . " requests=$requests pid=$$ ppid=" . getppid() . "\n"]];
};
$app;
