# Every framework's app in one Starman, chosen by the Host header: the
# reference the frameworks' tests compare the Emperor's vassals with.
use strict;
use warnings;
use File::Basename ();
use Plack::Builder;
use Plack::Util ();

my $here = File::Basename::dirname(__FILE__);
builder {
    mount 'http://cat.test/'    => Plack::Util::load_psgi("$here/catalyst/catapp.psgi");
    mount 'http://mojo.test/'   => Plack::Util::load_psgi("$here/mojo.psgi");
    mount 'http://dancer.test/' => Plack::Util::load_psgi("$here/dancer/app.psgi");
    mount 'http://plack.test/'  => Plack::Util::load_psgi("$here/plack.psgi");
};
