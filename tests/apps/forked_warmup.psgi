# An app whose warm-up path misbehaves only in a process forked from the one
# that loaded it (the base's own early-warmup succeeds): a library that is
# not fork-safe, a connection inherited from the base. FORKED_WARMUP says
# how: "exit" (the process exits with status 3) or "hang" (it never returns).
use strict;
use warnings;
my $loader = $$;
my $how = $ENV{FORKED_WARMUP} // 'exit';
my $app = sub {
    my ($env) = @_;
    if ($env->{PATH_INFO} eq '/warm' && $$ != $loader) {
        CORE::exit(3) if $how eq 'exit';
        select undef, undef, undef, 3600 while 1;
    }
    return [200, ['Content-Type' => 'text/plain'],
            ["name=" . ($ENV{APP_NAME} // '-') . " pid=$$ ppid=" . getppid() . "\n"]];
};
$app;
