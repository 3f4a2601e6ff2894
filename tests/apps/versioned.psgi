# A PSGI app whose version is read once, when the code is loaded (in a
# base, before any fork): a vassal forked from a base answers the version
# that base loaded. The file is version.txt in the working directory (an
# Emperor's vassals directory).
# With VERSIONED_HOLD naming a file, loading waits while that file exists
# (60 s at most): a test keeps a new base loading as long as it needs.
use strict;
use warnings;
if (my $hold = $ENV{VERSIONED_HOLD}) {
    my $until = time + 60;
    select(undef, undef, undef, 0.02) while -e $hold && time < $until;
}
open my $fh, '<', 'version.txt' or die "version.txt: $!\n";
chomp(my $version = <$fh> // '');
close $fh;
my $app = sub {
    my $name = $ENV{APP_NAME} // '-';
    return [200, ['Content-Type' => 'text/plain'], ["name=$name value=$version pid=$$\n"]];
};
$app;
