# Tells what a vassal's process was given for its memory: glibc's tunables
# in its %ENV (what a program it runs would inherit) and whether the kernel
# gives it transparent huge pages (the THP_enabled line of its status).
use strict;
use warnings;
my $app = sub {
    my $tunables = $ENV{GLIBC_TUNABLES} // '-';
    my $thp = '-';
    if (open my $fh, '<', "/proc/$$/status") {
        while (<$fh>) { $thp = $1 if /^THP_enabled:\s*(\d+)/ }
    }
    return [200, ['Content-Type' => 'text/plain'], ["pid=$$ tunables=$tunables thp=$thp\n"]];
};
$app;
